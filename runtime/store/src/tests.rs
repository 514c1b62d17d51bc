use std::time::Duration;

use super::*;

fn open(path: &Path) -> (Store, Snapshot) {
    Store::open(
        path,
        StoreOptions {
            commit_interval: Duration::from_millis(1),
        },
    )
    .unwrap()
}

#[tokio::test]
async fn ops_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let (store, snapshot) = open(&path);
    assert_eq!(snapshot, Snapshot::default());
    let c = |s: &str| s.to_string();
    let ticket = store.submit([
        Op::PutRetained {
            topic: c("a"),
            record: vec![1],
        },
        Op::PutRetained {
            topic: c("b"),
            record: vec![2],
        },
        Op::DeleteRetained { topic: c("b") },
        Op::PutSession {
            client_id: c("c1"),
            expiry_secs: 60,
            owner: Some(c("alice")),
        },
        Op::PutSubscription {
            client_id: c("c1"),
            filter: c("x/#"),
            record: vec![9],
        },
        Op::PutDelivery {
            client_id: c("c1"),
            seq: 1,
            record: vec![7],
        },
        Op::PutDelivery {
            client_id: c("c1"),
            seq: 2,
            record: vec![8],
        },
        Op::SetDeliveryState {
            client_id: c("c1"),
            seq: 2,
            packet_id: 5,
            released: true,
        },
        Op::DeleteDelivery {
            client_id: c("c1"),
            seq: 1,
        },
        Op::PutInbound {
            client_id: c("c1"),
            packet_id: 3,
        },
        Op::SetDisconnected {
            client_id: c("c1"),
            at_unix_secs: Some(1000),
        },
        Op::PutSession {
            client_id: c("gone"),
            expiry_secs: 5,
            owner: None,
        },
        Op::PutSubscription {
            client_id: c("gone"),
            filter: c("y"),
            record: vec![],
        },
        Op::DeleteSession {
            client_id: c("gone"),
        },
    ]);
    ticket.wait().await.unwrap();
    store.close();

    let (store, snapshot) = open(&path);
    assert_eq!(snapshot.retained, vec![(c("a"), vec![1])]);
    assert_eq!(
        snapshot.sessions,
        vec![StoredSession {
            client_id: c("c1"),
            expiry_secs: 60,
            owner: Some(c("alice")),
            disconnected_at: Some(1000),
            subscriptions: vec![(c("x/#"), vec![9])],
            deliveries: vec![StoredDelivery {
                seq: 2,
                record: vec![8],
                packet_id: Some(5),
                released: true
            }],
            inbound_qos2: vec![3],
        }]
    );
    assert_eq!(max_seq(&snapshot), 2);
    store.close();
}

#[tokio::test]
async fn many_submits_share_few_commits() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(
        &dir.path().join("s.db"),
        StoreOptions {
            commit_interval: Duration::from_millis(50),
        },
    )
    .unwrap();
    let mut last = None;
    for i in 0..1000u64 {
        let ticket = store.submit_one(Op::PutDelivery {
            client_id: "c".into(),
            seq: i,
            record: vec![0; 100],
        });
        last = Some(ticket);
    }
    let last = last.unwrap();
    assert!(
        last.batch() <= 2,
        "1000 quick submits fell into {} batches",
        last.batch()
    );
    last.wait().await.unwrap();
    store.close();
}

#[test]
fn garbage_file_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
    let error = match Store::open(&path, StoreOptions::default()) {
        Err(e) => e,
        Ok(_) => panic!("opened a garbage file"),
    };
    assert!(matches!(error, StoreError::Corrupt { .. }), "{error}");
    assert!(
        error.to_string().contains(&path.display().to_string()),
        "{error}"
    );
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
    }
    let error = match Store::open(&path, StoreOptions::default()) {
        Err(e) => e,
        Ok(_) => panic!("opened a newer schema"),
    };
    assert!(matches!(error, StoreError::TooNew { .. }), "{error}");
}

#[tokio::test]
async fn tickets_after_close_fail() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir.path().join("s.db"));
    store.close();
    let ticket = store.submit_one(Op::DeleteRetained { topic: "x".into() });
    assert!(matches!(ticket.wait().await, Err(StoreError::Closed)));
}
