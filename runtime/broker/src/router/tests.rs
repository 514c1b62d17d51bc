use std::time::Duration;

use super::*;
use crate::{message::QoS, topic};

fn router() -> Router {
    Router::new(RouterLimits {
        max_queued: 4,
        max_session_expiry_secs: 3600,
    })
}

fn msg(topic: &str, payload: &str, qos: QoS) -> Message {
    Message::new(topic.to_string(), payload.as_bytes().to_vec(), qos)
}

async fn next(client: &LocalClient) -> Delivery {
    tokio::time::timeout(Duration::from_secs(2), client.recv())
        .await
        .expect("a delivery within 2s")
        .expect("session alive")
}

fn nothing_queued(client: &LocalClient) {
    assert_eq!(client.queued(), 0, "no further delivery expected");
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_one_copy_at_highest_qos_with_all_ids() {
    let r = router();
    let sub = r.local_client("sub");
    let o = |qos, id| SubOptions {
        subscription_id: Some(id),
        ..SubOptions::qos(qos)
    };
    sub.subscribe("a/+", o(QoS::AtMostOnce, 1)).unwrap();
    sub.subscribe("a/#", o(QoS::ExactlyOnce, 2)).unwrap();
    sub.subscribe("a/b", o(QoS::AtLeastOnce, 3)).unwrap();
    let publisher = r.local_client("pub");
    assert_eq!(
        publisher
            .publish(msg("a/b", "x", QoS::ExactlyOnce))
            .delivered,
        1
    );
    let d = next(&sub).await;
    assert_eq!(d.qos, QoS::ExactlyOnce);
    let mut ids = d.subscription_ids.clone();
    ids.sort();
    assert_eq!(ids, vec![1, 2, 3]);
    nothing_queued(&sub);
}

#[tokio::test]
async fn granted_qos_caps_delivery_qos() {
    let r = router();
    let sub = r.local_client("sub");
    sub.subscribe("t", SubOptions::qos(QoS::AtLeastOnce))
        .unwrap();
    r.publish(msg("t", "x", QoS::ExactlyOnce));
    assert_eq!(next(&sub).await.qos, QoS::AtLeastOnce);
    r.publish(msg("t", "y", QoS::AtMostOnce));
    assert_eq!(next(&sub).await.qos, QoS::AtMostOnce);
}

#[tokio::test]
async fn dollar_topics_skip_leading_wildcards() {
    let r = router();
    let sub = r.local_client("sub");
    sub.subscribe("#", SubOptions::qos(QoS::AtMostOnce))
        .unwrap();
    sub.subscribe("+/x", SubOptions::qos(QoS::AtMostOnce))
        .unwrap();
    assert_eq!(r.publish(msg("$SYS/x", "1", QoS::AtMostOnce)).delivered, 0);
    sub.subscribe("$SYS/#", SubOptions::qos(QoS::AtMostOnce))
        .unwrap();
    assert_eq!(r.publish(msg("$SYS/x", "1", QoS::AtMostOnce)).delivered, 1);
}

#[tokio::test]
async fn retained_set_replace_clear_and_replay() {
    let r = router();
    r.publish(msg("r/1", "a", QoS::AtLeastOnce).with_retain(true));
    r.publish(msg("r/1", "b", QoS::AtLeastOnce).with_retain(true));
    r.publish(msg("r/2", "c", QoS::AtMostOnce).with_retain(true));
    r.publish(msg("r/2", "", QoS::AtMostOnce).with_retain(true));
    assert_eq!(r.retained_count(), 1);
    let sub = r.local_client("sub");
    sub.subscribe("r/#", SubOptions::qos(QoS::ExactlyOnce))
        .unwrap();
    let d = next(&sub).await;
    assert_eq!(&d.message.payload[..], b"b");
    assert!(d.retain, "retained replay carries the retain flag");
    assert_eq!(d.qos, QoS::AtLeastOnce);
    nothing_queued(&sub);
    // Normal delivery clears retain unless retain-as-published.
    r.publish(msg("r/1", "c", QoS::AtMostOnce).with_retain(true));
    assert!(!next(&sub).await.retain);
}

#[tokio::test]
async fn retain_handling_options() {
    let r = router();
    r.publish(msg("k", "v", QoS::AtMostOnce).with_retain(true));
    let sub = r.local_client("sub");
    let o = |rh| SubOptions {
        retain_handling: rh,
        ..SubOptions::qos(QoS::AtMostOnce)
    };
    sub.subscribe("k", o(2)).unwrap();
    nothing_queued(&sub);
    sub.subscribe("k", o(1)).unwrap();
    nothing_queued(&sub); // not new
    sub.unsubscribe("k").unwrap();
    sub.subscribe("k", o(1)).unwrap();
    assert_eq!(sub.queued(), 1);
    sub.subscribe("k", o(0)).unwrap();
    assert_eq!(sub.queued(), 2);
}

#[tokio::test]
async fn no_local_skips_own_messages() {
    let r = router();
    let c = r.local_client("c");
    c.subscribe(
        "t",
        SubOptions {
            no_local: true,
            ..SubOptions::qos(QoS::AtMostOnce)
        },
    )
    .unwrap();
    assert_eq!(c.publish(msg("t", "x", QoS::AtMostOnce)).delivered, 0);
    assert_eq!(r.publish(msg("t", "x", QoS::AtMostOnce)).delivered, 1);
}

#[tokio::test]
async fn shared_subscriptions_spread_messages() {
    let r = router();
    let a = r.local_client("a");
    let b = r.local_client("b");
    a.subscribe("$share/g/s/+", SubOptions::qos(QoS::AtMostOnce))
        .unwrap();
    b.subscribe("$share/g/s/+", SubOptions::qos(QoS::AtMostOnce))
        .unwrap();
    for i in 0..4 {
        assert_eq!(
            r.publish(msg("s/x", &i.to_string(), QoS::AtMostOnce))
                .delivered,
            1
        );
    }
    assert_eq!(a.queued(), 2);
    assert_eq!(b.queued(), 2);
}

#[tokio::test]
async fn queue_is_bounded_and_drops_are_reported() {
    let r = router();
    let sub = r.local_client("sub");
    sub.subscribe("q", SubOptions::qos(QoS::AtLeastOnce))
        .unwrap();
    for _ in 0..4 {
        assert_eq!(r.publish(msg("q", "x", QoS::AtLeastOnce)).delivered, 1);
    }
    let routed = r.publish(msg("q", "x", QoS::AtLeastOnce));
    assert_eq!((routed.delivered, routed.dropped), (0, 1));
}

#[tokio::test]
async fn persistent_session_keeps_subscriptions_and_queues_offline() {
    let r = router();
    let options = AttachOptions {
        client_id: "p".into(),
        clean_start: false,
        session_expiry_secs: 60,
        owner: None,
        credential: Credential::Anonymous,
    };
    let first = r.attach(options.clone());
    assert!(!first.session_present);
    r.subscribe(
        &first.session,
        &Filter::parse("p/#").unwrap(),
        SubOptions::qos(QoS::AtLeastOnce),
    );
    r.detach(&first.session, first.generation, None);
    assert_eq!(r.publish(msg("p/1", "kept", QoS::AtLeastOnce)).delivered, 1);
    assert_eq!(r.publish(msg("p/1", "qos0", QoS::AtMostOnce)).dropped, 1);
    let second = r.attach(options);
    assert!(second.session_present);
    assert_eq!(second.session.queued_len(), 1);
}

#[tokio::test]
async fn takeover_supersedes_the_old_connection() {
    let r = router();
    let options = AttachOptions {
        client_id: "t".into(),
        clean_start: false,
        session_expiry_secs: 60,
        owner: None,
        credential: Credential::Anonymous,
    };
    let first = r.attach(options.clone());
    let second = r.attach(options);
    let mut out = Vec::new();
    assert!(
        first
            .session
            .next_outgoing(first.generation, 10, 10, &mut out)
            .is_err()
    );
    assert!(
        second
            .session
            .next_outgoing(second.generation, 10, 10, &mut out)
            .is_ok()
    );
}

#[tokio::test]
async fn inflight_window_and_redelivery_after_reconnect() {
    let r = router();
    let options = AttachOptions {
        client_id: "w".into(),
        clean_start: false,
        session_expiry_secs: 60,
        owner: None,
        credential: Credential::Anonymous,
    };
    let a = r.attach(options.clone());
    r.subscribe(
        &a.session,
        &Filter::parse("w").unwrap(),
        SubOptions::qos(QoS::AtLeastOnce),
    );
    for _ in 0..3 {
        r.publish(msg("w", "x", QoS::AtLeastOnce));
    }
    let mut out = Vec::new();
    a.session
        .next_outgoing(a.generation, 2, 10, &mut out)
        .unwrap();
    assert_eq!(out.len(), 2, "window of 2");
    let ids: Vec<u16> = out.iter().map(|o| o.packet_id.unwrap().get()).collect();
    a.session.acknowledge(ids[0]);
    r.detach(&a.session, a.generation, None);
    let b = r.attach(options);
    let again = b.session.take_redelivery(b.generation).unwrap();
    assert_eq!(again.len(), 1);
    assert!(again[0].dup);
    assert_eq!(again[0].packet_id.unwrap().get(), ids[1]);
}

#[tokio::test]
async fn will_is_published_after_delay_unless_reconnected() {
    let r = router();
    let watcher = r.local_client("watch");
    watcher
        .subscribe("will/#", SubOptions::qos(QoS::AtLeastOnce))
        .unwrap();
    let options = AttachOptions {
        client_id: "w".into(),
        clean_start: false,
        session_expiry_secs: 60,
        owner: None,
        credential: Credential::Anonymous,
    };
    let will = |delay| Will {
        message: msg("will/w", "gone", QoS::AtLeastOnce),
        delay_secs: delay,
    };
    // Immediate will.
    let a = r.attach(options.clone());
    r.detach(&a.session, a.generation, Some(will(0)));
    assert_eq!(&next(&watcher).await.message.payload[..], b"gone");
    // Delayed will cancelled by a reconnect.
    let b = r.attach(options.clone());
    r.detach(&b.session, b.generation, Some(will(1)));
    let c = r.attach(options.clone());
    tokio::time::sleep(Duration::from_millis(1300)).await;
    nothing_queued(&watcher);
    // A will whose delay outlasts the session is published when the session ends.
    r.set_session_expiry(&c.session, 1);
    r.detach(&c.session, c.generation, Some(will(100)));
    let d = tokio::time::timeout(Duration::from_secs(3), watcher.recv()).await;
    assert!(d.is_ok(), "will published at session end");
    assert_eq!(r.session_count(), 1, "only the watcher's session remains");
}

#[tokio::test]
async fn clean_start_discards_the_old_session() {
    let r = router();
    let persistent = AttachOptions {
        client_id: "c".into(),
        clean_start: false,
        session_expiry_secs: 60,
        owner: None,
        credential: Credential::Anonymous,
    };
    let a = r.attach(persistent.clone());
    r.subscribe(
        &a.session,
        &Filter::parse("x").unwrap(),
        SubOptions::qos(QoS::AtLeastOnce),
    );
    r.detach(&a.session, a.generation, None);
    let b = r.attach(AttachOptions {
        clean_start: true,
        ..persistent
    });
    assert!(!b.session_present);
    assert_eq!(r.subscription_count(), 0);
}

#[test]
fn tree_agrees_with_reference_matching() {
    use proptest::prelude::*;
    let level = prop_oneof![Just("a"), Just("b"), Just(""), Just("$s")];
    let topic = proptest::collection::vec(level.clone(), 1..5)
        .prop_map(|l| l.join("/"))
        .prop_filter("valid topic", |t| topic::validate_name(t).is_ok());
    let flevel = prop_oneof![Just("a"), Just("b"), Just(""), Just("+"), Just("$s")];
    let filter = (proptest::collection::vec(flevel, 1..5), any::<bool>())
        .prop_map(|(mut l, hash)| {
            if hash {
                l.push("#");
            }
            l.join("/")
        })
        .prop_filter("valid filter", |f| Filter::parse(f).is_ok());
    let mut runner = proptest::test_runner::TestRunner::default();
    runner
        .run(
            &(proptest::collection::vec(filter, 1..8), topic),
            |(filters, topic)| {
                let r = router();
                let mut sessions = Vec::new();
                for (i, f) in filters.iter().enumerate() {
                    let a = r.attach(AttachOptions {
                        client_id: format!("c{i}").into(),
                        clean_start: true,
                        session_expiry_secs: 0,
                        owner: None,
                        credential: Credential::Anonymous,
                    });
                    r.subscribe(
                        &a.session,
                        &Filter::parse(f).unwrap(),
                        SubOptions::qos(QoS::AtMostOnce),
                    );
                    sessions.push(a.session);
                }
                let mut got = Vec::new();
                read(&r.0.tree).for_each_match(&topic, |e, _| got.push(e.session.id));
                got.sort();
                let mut want: Vec<u64> = filters
                    .iter()
                    .zip(&sessions)
                    .filter(|(f, _)| topic::matches(f, &topic))
                    .map(|(_, s)| s.id)
                    .collect();
                want.sort();
                prop_assert_eq!(got, want, "topic {} filters {:?}", topic, filters);
                Ok(())
            },
        )
        .unwrap();
}

#[tokio::test]
async fn large_fan_out_still_merges_overlapping_subscriptions() {
    let r = router();
    let clients: Vec<LocalClient> = (0..40).map(|i| r.local_client(&format!("c{i}"))).collect();
    for c in &clients {
        c.subscribe("f/+", SubOptions::qos(QoS::AtMostOnce))
            .unwrap();
        c.subscribe("f/#", SubOptions::qos(QoS::AtLeastOnce))
            .unwrap();
    }
    clients[0]
        .subscribe("$share/g/f/x", SubOptions::qos(QoS::AtMostOnce))
        .unwrap();
    let routed = r.publish(msg("f/x", "v", QoS::AtLeastOnce));
    // One merged delivery per client plus the shared-group pick as its own delivery.
    assert_eq!(routed.delivered, 41);
    assert_eq!(clients[0].queued(), 2);
    for c in &clients[1..] {
        assert_eq!(c.queued(), 1);
        assert_eq!(next(c).await.qos, QoS::AtLeastOnce);
    }
}

#[tokio::test]
async fn a_batch_is_routed_in_order_and_wakes_every_waiting_receiver() {
    let r = router();
    let a = Arc::new(r.local_client("a"));
    let b = Arc::new(r.local_client("b"));
    a.subscribe("a/#", SubOptions::qos(QoS::AtLeastOnce))
        .unwrap();
    b.subscribe("b/#", SubOptions::qos(QoS::AtMostOnce))
        .unwrap();
    // Both already wait when the batch comes: only the wake at its end can reach them.
    let waiting = |client: Arc<LocalClient>| {
        tokio::spawn(async move {
            let mut got = vec![next(&client).await];
            while let Some(delivery) = client.try_recv() {
                got.push(delivery);
            }
            got.iter()
                .map(|d| String::from_utf8_lossy(&d.message.payload).into_owned())
                .collect::<Vec<_>>()
        })
    };
    let (got_a, got_b) = (waiting(a.clone()), waiting(b.clone()));
    tokio::task::yield_now().await;
    let publisher = r.local_client("pub");
    // `no_local`: the publisher's own batch skips it, so the batch carries its origin.
    let own = SubOptions {
        no_local: true,
        ..SubOptions::qos(QoS::AtMostOnce)
    };
    publisher.subscribe("#", own).unwrap();
    publisher.publish_batch([
        msg("a/1", "a1", QoS::AtLeastOnce),
        msg("b/1", "b1", QoS::AtMostOnce),
        msg("a/2", "a2", QoS::AtLeastOnce),
        msg("b/2", "b2", QoS::AtMostOnce),
        msg("a/3", "a3", QoS::AtLeastOnce),
    ]);
    assert_eq!(got_a.await.unwrap(), ["a1", "a2", "a3"]);
    assert_eq!(got_b.await.unwrap(), ["b1", "b2"]);
    nothing_queued(&publisher);
}
