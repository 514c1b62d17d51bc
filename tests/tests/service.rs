//! Running as a service: systemd notifications (`Type=notify` with the watchdog), and what a
//! reload (SIGHUP, `systemctl reload`) changes live without dropping connections: ACLs and
//! users, the log level; what needs a restart is named in the log.

use std::{
    os::unix::net::UnixDatagram,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use edgegw_tests::{Gateway, binary, message};
use rumqttc::{Client, MqttOptions, QoS};

mod common;

use common::{Observer, WAIT};

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid}");
}

/// Every datagram the gateway sends to the socket until `until` is among them (or the
/// deadline passes): each one's `KEY=value` lines.
fn receive_until(socket: &UnixDatagram, until: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while Instant::now() < deadline {
        match socket.recv(&mut buffer) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
                let done = text.lines().any(|l| l == until);
                seen.push(text);
                if done {
                    return seen;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
    panic!("no {until} within {timeout:?}; got {seen:?}");
}

#[test]
fn systemd_notifications_ready_watchdog_reload_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "gateway:\n  data_dir: {}\nbroker:\n  listeners:\n    - bind: 127.0.0.1:0\nmetrics:\n  bind: 127.0.0.1:0\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut child = Command::new(binary())
        .args(["run", "-c"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        // 400 ms: the gateway must ping every 200 ms.
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn edgegw");
    let pid = child.id();

    let started = receive_until(&socket, "READY=1", Duration::from_secs(60));
    assert!(
        started.last().unwrap().contains("STATUS="),
        "READY=1 comes with a STATUS: {started:?}"
    );
    // Watchdog pings: at least 4 within 2 s (one per 200 ms).
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut pings = 0;
    let mut buffer = [0u8; 256];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buffer)
            && &buffer[..n] == b"WATCHDOG=1"
        {
            pings += 1;
        }
    }
    assert!(
        pings >= 4,
        "{pings} watchdog pings in 2 s with WatchdogSec=400ms"
    );

    signal(pid, "HUP");
    let reload = receive_until(&socket, "READY=1", Duration::from_secs(30));
    assert!(
        reload.iter().any(|m| m.lines().any(|l| l == "RELOADING=1")),
        "RELOADING=1 before READY=1 on SIGHUP: {reload:?}"
    );

    signal(pid, "TERM");
    receive_until(&socket, "STOPPING=1", Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
}

#[test]
fn no_notify_socket_means_no_notifications_and_a_normal_run() {
    // A NOTIFY_SOCKET nobody listens on is not a reason to fail.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "gateway:\n  data_dir: {}\nbroker:\n  listeners:\n    - bind: 127.0.0.1:0\nmetrics:\n  bind: 127.0.0.1:0\nlog:\n  format: json\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let output = Command::new(binary())
        .args(["check", "-c"])
        .arg(&config)
        .env("NOTIFY_SOCKET", dir.path().join("nobody.sock"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let gw = Gateway::start_file(&config, dir);
    assert_eq!(gw.http_get("/readyz").0, 200);
}

fn acl_config(path: &Path, data: &Path, extra_publish: &str, level: &str, port: u16) {
    std::fs::write(
        path,
        format!(
            "gateway:\n  id: reload\n  data_dir: {data}\nbroker:\n  listeners:\n    - bind: 127.0.0.1:{port}\n  acl:\n    default: deny\n    rules:\n      - {{ permission: allow, action: subscribe, topics: [ \"#\" ] }}\n      - {{ permission: allow, action: publish, topics: [ \"open/#\"{extra_publish} ] }}\nmetrics:\n  bind: 127.0.0.1:0\nlog:\n  level: {level}\n  format: json\n",
            data = data.display()
        ),
    )
    .unwrap();
}

#[test]
fn reload_applies_acls_to_open_connections_and_names_what_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let data = dir.path().join("data");
    acl_config(&path, &data, "", "info", 0);
    let gw = Gateway::start_file(&path, dir);
    let observer = Observer::start(gw.mqtt, "#");

    let mut options = MqttOptions::new("publisher", "127.0.0.1", gw.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (publisher, mut connection) = Client::new(options, 100);
    let (connected_tx, connected) = std::sync::mpsc::channel();
    let events = std::thread::spawn(move || {
        let mut connects = 0;
        for event in connection.iter() {
            match event {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    connects += 1;
                    let _ = connected_tx.send(());
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        connects
    });
    connected.recv_timeout(WAIT).expect("CONNACK");

    publisher
        .publish("open/a", QoS::AtLeastOnce, false, "1")
        .unwrap();
    publisher
        .publish("closed/a", QoS::AtLeastOnce, false, "denied")
        .unwrap();
    publisher
        .publish("open/b", QoS::AtLeastOnce, false, "2")
        .unwrap();
    let got = observer.wait_for(2, WAIT);
    std::thread::sleep(Duration::from_millis(300));
    let got_before: Vec<_> = observer.received.lock().unwrap().clone();
    assert_eq!(
        got_before,
        vec![
            ("open/a".to_string(), "1".to_string()),
            ("open/b".to_string(), "2".to_string())
        ],
        "closed/# is denied before the reload (got {got:?})"
    );

    // Allow closed/#, raise the log level, and change the listener (needs a restart).
    let port = edgegw_tests::mosquitto::free_port();
    acl_config(&path, &data, ", \"closed/#\"", "debug", port);
    signal(gw.pid(), "HUP");
    assert!(
        gw.wait_log(WAIT, |l| message(l)
            == Some(
                "Broker auth (password file re-read, anonymous access) and ACLs reloaded."
            )),
        "{:#?}",
        gw.logs()
    );
    assert!(
        gw.wait_log(WAIT, |l| l["fields"]["sections"]
            .as_str()
            .is_some_and(|s| s.contains("broker.listeners"))),
        "the listener change is reported as needing a restart: {:#?}",
        gw.logs()
    );
    assert!(gw.wait_log(WAIT, |l| message(l) == Some("Log level changed.")));

    // The same connection may now publish to closed/#.
    publisher
        .publish("closed/b", QoS::AtLeastOnce, false, "allowed")
        .unwrap();
    let got = observer.wait_for(3, WAIT);
    assert_eq!(
        got.last(),
        Some(&("closed/b".to_string(), "allowed".to_string())),
        "{got:?}"
    );
    assert_eq!(got.len(), 3, "{got:?}");
    // Debug logging is on now (the gateway logs each SUBSCRIBE/PUBLISH denial at debug).
    publisher.disconnect().unwrap();
    let connects = events.join().unwrap();
    assert_eq!(
        connects, 1,
        "the publisher's connection survived the reload"
    );
    // The old listener still serves (listeners change only after a restart).
    let again = Observer::start(gw.mqtt, "x");
    drop(again);
}

#[test]
fn reload_with_a_broken_config_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let data = dir.path().join("data");
    acl_config(&path, &data, "", "info", 0);
    let gw = Gateway::start_file(&path, dir);
    std::fs::write(&path, "broker:\n  acl:\n    default: maybe\n").unwrap();
    signal(gw.pid(), "HUP");
    assert!(
        gw.wait_log(WAIT, |l| message(l).is_some_and(
            |m| m.starts_with("Reload refused; everything keeps running")
        )),
        "{:#?}",
        gw.logs()
    );
    let observer = Observer::start(gw.mqtt, "#");
    observer.publish("closed/x", "still denied");
    observer.publish("open/x", "ok");
    let got = observer.wait_for(1, WAIT);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        observer.received.lock().unwrap().clone(),
        vec![("open/x".to_string(), "ok".to_string())],
        "{got:?}"
    );
}
