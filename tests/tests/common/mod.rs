//! Shared by the end-to-end tests that use MQTT observers and sequenced publishers.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use edgegw_tests::{
    mosquitto::free_port,
    raw::{self, Raw},
};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

pub const WAIT: Duration = Duration::from_secs(20);

/// A subscriber at the cloud broker, collecting `(topic, payload)` in arrival order.
pub struct Observer {
    pub client: Client,
    pub received: Arc<Mutex<Vec<(String, String)>>>,
}

impl Observer {
    pub fn start(broker: SocketAddr, filter: &str) -> Self {
        let mut options = MqttOptions::new(
            format!("observer-{}", free_port()),
            broker.ip().to_string(),
            broker.port(),
        );
        options.set_keep_alive(Duration::from_secs(30));
        options.set_inflight(100);
        let (client, mut connection) = Client::new(options, 1000);
        client.subscribe(filter, QoS::AtLeastOnce).unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::Publish(p))) => sink.lock().unwrap().push((
                        p.topic.clone(),
                        String::from_utf8_lossy(&p.payload).into_owned(),
                    )),
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        subscribed.recv_timeout(WAIT).expect("observer SUBACK");
        Self { client, received }
    }

    pub fn wait_for(&self, count: usize, timeout: Duration) -> Vec<(String, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received.lock().unwrap().clone();
            if got.len() >= count || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn publish(&self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .unwrap();
    }
}

/// Publishes `seqs` at QoS 1 (payload: the number), up to 20 unacknowledged at a time.
/// Returns the numbers the gateway acknowledged (it stops at the first failure).
pub fn publish_seq(gw: SocketAddr, topic: &str, seqs: std::ops::Range<u32>) -> Vec<u32> {
    let mut c = Raw::connect(gw);
    c.send(&raw::connect_v3(&format!("pub-{}", free_port()), true, 60));
    assert_eq!(c.read(WAIT).expect("CONNACK").kind(), 2);
    let mut acked = Vec::new();
    let mut pending: HashMap<u16, u32> = HashMap::new();
    let all: Vec<u32> = seqs.collect();
    for chunk in all.chunks(20) {
        for &seq in chunk {
            let pid = (seq % 60_000 + 1) as u16;
            if !c.try_send(&raw::publish_v3(
                topic,
                1,
                pid,
                false,
                seq.to_string().as_bytes(),
            )) {
                return acked;
            }
            pending.insert(pid, seq);
        }
        while !pending.is_empty() {
            match c.read(WAIT) {
                Some(p) if p.kind() == 4 => {
                    let pid = u16::from_be_bytes([p.body[0], p.body[1]]);
                    if let Some(seq) = pending.remove(&pid) {
                        acked.push(seq);
                    }
                }
                Some(_) => {}
                None => return acked,
            }
        }
    }
    acked
}
