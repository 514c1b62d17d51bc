use std::time::Duration;

use super::*;

fn options() -> OutboxOptions {
    OutboxOptions {
        commit_interval: Duration::from_millis(2),
        ..OutboxOptions::new("test")
    }
}

fn queued(appended: Appended) -> Ticket {
    match appended {
        Appended::Queued(ticket) => ticket,
        Appended::Dropped(reason) => panic!("dropped: {reason}"),
    }
}

fn append(outbox: &Outbox, i: usize) -> Appended {
    outbox.append(
        &format!("t/{i}"),
        format!("payload {i}").as_bytes(),
        1,
        false,
        Vec::new(),
    )
}

async fn all(outbox: &Outbox) -> Vec<OutboxEntry> {
    outbox.fetch(0, usize::MAX >> 1).await.unwrap()
}

#[tokio::test]
async fn entries_come_back_in_order_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let outbox = Outbox::open(&path, options()).unwrap();
    let mut last = None;
    for i in 0..100 {
        last = Some(queued(append(&outbox, i)));
    }
    last.unwrap().wait().await.unwrap();
    let entries = all(&outbox).await;
    assert_eq!(entries.len(), 100);
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
        assert_eq!(e.topic, format!("t/{i}"));
        assert_eq!(e.payload, format!("payload {i}").into_bytes());
    }
    let page = outbox.fetch(10, 5).await.unwrap();
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [11, 12, 13, 14, 15]
    );
    for seq in 1..=40 {
        outbox.ack_through(seq).unwrap();
    }
    // The acknowledgements commit with the next append.
    queued(append(&outbox, 100)).wait().await.unwrap();
    let stats = outbox.stats();
    assert_eq!(stats.messages, 61);
    let bytes: u64 = all(&outbox).await.iter().map(OutboxEntry::size).sum();
    assert_eq!(stats.bytes, bytes);
    outbox.close();

    let outbox = Outbox::open(&path, options()).unwrap();
    let stats = outbox.stats();
    assert_eq!((stats.messages, stats.bytes), (61, bytes));
    assert_eq!(stats.committed_seq, 101);
    let entries = all(&outbox).await;
    assert_eq!(entries.first().unwrap().seq, 41);
    assert_eq!(entries.last().unwrap().seq, 101);
    // Sequence numbers continue after the highest one on disk.
    queued(append(&outbox, 101)).wait().await.unwrap();
    assert_eq!(all(&outbox).await.last().unwrap().seq, 102);
    outbox.close();
}

#[tokio::test]
async fn drop_new_refuses_at_the_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(
        &dir.path().join("o.db"),
        OutboxOptions {
            max_messages: 5,
            on_full: OnFull::DropNew,
            ..options()
        },
    )
    .unwrap();
    for i in 0..5 {
        queued(append(&outbox, i));
    }
    assert!(matches!(append(&outbox, 5), Appended::Dropped("full")));
    outbox.ack_through(1).unwrap();
    // Space returns once the acknowledgement is committed.
    tokio::time::sleep(Duration::from_millis(50)).await;
    queued(append(&outbox, 6)).wait().await.unwrap();
    let seqs: Vec<u64> = all(&outbox).await.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [2, 3, 4, 5, 6]);

    let small = Outbox::open(
        &dir.path().join("small.db"),
        OutboxOptions {
            max_bytes: 50,
            ..options()
        },
    )
    .unwrap();
    assert!(matches!(
        small.append("t", &[0u8; 60], 1, false, Vec::new()),
        Appended::Dropped("too_large")
    ));
}

#[tokio::test]
async fn drop_oldest_keeps_the_newest_within_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(
        &dir.path().join("o.db"),
        OutboxOptions {
            max_messages: 10,
            on_full: OnFull::DropOldest,
            ..options()
        },
    )
    .unwrap();
    let mut last = None;
    for i in 0..25 {
        last = Some(queued(append(&outbox, i)));
    }
    last.unwrap().wait().await.unwrap();
    let seqs: Vec<u64> = all(&outbox).await.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (16..=25).collect::<Vec<_>>());
    assert_eq!(outbox.stats().messages, 10);

    // By bytes: every entry is 3 + 10 bytes here.
    let by_bytes = Outbox::open(
        &dir.path().join("b.db"),
        OutboxOptions {
            max_bytes: 13 * 4,
            on_full: OnFull::DropOldest,
            ..options()
        },
    )
    .unwrap();
    let mut last = None;
    for i in 0..9 {
        last = Some(queued(by_bytes.append(
            "t/x",
            b"0123456789",
            1,
            false,
            Vec::new(),
        )));
        let _ = i;
    }
    last.unwrap().wait().await.unwrap();
    let seqs: Vec<u64> = all(&by_bytes).await.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [6, 7, 8, 9]);
    assert_eq!(by_bytes.stats().bytes, 52);
}

#[tokio::test]
async fn block_holds_the_ticket_until_space_frees() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(
        &dir.path().join("o.db"),
        OutboxOptions {
            max_messages: 3,
            on_full: OnFull::Block,
            max_blocked: 2,
            ..options()
        },
    )
    .unwrap();
    for i in 0..3 {
        queued(append(&outbox, i)).wait().await.unwrap();
    }
    let blocked = queued(append(&outbox, 3));
    let second = queued(append(&outbox, 4));
    assert!(matches!(append(&outbox, 5), Appended::Dropped("full")));
    let mut blocked = Box::pin(blocked.wait());
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut blocked)
            .await
            .is_err(),
        "a blocked message must not be durable before there is room"
    );
    outbox.ack_through(1).unwrap();
    // The ack alone commits; the blocked message is admitted right after.
    tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .expect("admitted after the ack")
        .unwrap();
    let seqs: Vec<u64> = all(&outbox).await.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [2, 3, 4]);
    assert_eq!(all(&outbox).await[2].topic, "t/3");
    outbox.ack_through(2).unwrap();
    tokio::time::timeout(Duration::from_secs(5), second.wait())
        .await
        .expect("second admitted")
        .unwrap();
    assert_eq!(all(&outbox).await.last().unwrap().topic, "t/4");
}

#[tokio::test]
async fn old_entries_expire() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(
        &dir.path().join("o.db"),
        OutboxOptions {
            max_age: Some(Duration::from_millis(300)),
            ..options()
        },
    )
    .unwrap();
    queued(append(&outbox, 0)).wait().await.unwrap();
    assert_eq!(outbox.stats().messages, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while outbox.stats().messages > 0 {
        assert!(std::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(all(&outbox).await.is_empty());
}

#[tokio::test]
async fn a_full_disk_acknowledges_nothing_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let outbox = Outbox::open(
        &path,
        OutboxOptions {
            max_pages: Some(40),
            ..options()
        },
    )
    .unwrap();
    // Fill the capped file until a commit fails.
    let mut durable = 0;
    let stuck = loop {
        let ticket = queued(outbox.append("t", &[7u8; 1000], 1, false, Vec::new()));
        match tokio::time::timeout(Duration::from_millis(500), ticket.wait()).await {
            Ok(Ok(())) => durable += 1,
            Ok(Err(e)) => panic!("a ticket must not fail, it waits: {e}"),
            Err(_) => break durable,
        }
        assert!(durable < 1000, "the page cap never filled the file");
    };
    assert!(stuck > 10);
    // Committed entries can still be read (the forwarder keeps going) ...
    let entries = all(&outbox).await;
    assert_eq!(entries.len(), stuck);
    // ... and once they are acknowledged upstream, the space returns and the held
    // message is written.
    let held = queued(outbox.append("t", b"after", 1, false, Vec::new()));
    for e in &entries {
        outbox.ack_through(e.seq).unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), held.wait())
        .await
        .expect("written after space returned")
        .unwrap();
    let left = all(&outbox).await;
    assert_eq!(
        left.len(),
        2,
        "the held message and the one that hit the full disk"
    );
    assert_eq!(left[1].payload, b"after");
    outbox.close();
    // Nothing is corrupt.
    let c = Connection::open(&path).unwrap();
    let check: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[tokio::test]
async fn ack_through_is_recorded_at_once_and_rows_follow_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let outbox = Outbox::open(&path, options()).unwrap();
    let mut last = None;
    for i in 0..10 {
        last = Some(queued(append(&outbox, i)));
    }
    last.unwrap().wait().await.unwrap();
    outbox.ack_through(4).unwrap();
    // The rows go within a few milliseconds, with the counts.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while outbox.stats().messages != 6 {
        assert!(std::time::Instant::now() < deadline, "{:?}", outbox.stats());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(all(&outbox).await[0].seq, 5);
    // The byte count follows the deleted rows, in memory and in the file's totals.
    let held = |entries: Vec<OutboxEntry>| entries.iter().map(OutboxEntry::size).sum::<u64>();
    assert_eq!(outbox.stats().bytes, held(all(&outbox).await));
    outbox.close();
    let outbox = Outbox::open(&path, options()).unwrap();
    assert_eq!(outbox.stats().bytes, held(all(&outbox).await));
    assert_eq!(outbox.stats().messages, 6);
    // Recorded but maybe not deleted when the process dies: the marker decides.
    outbox.ack_through(7).unwrap();
    drop(outbox);
    std::fs::write(
        marker_path(&path),
        [7u64.to_le_bytes(), (!7u64).to_le_bytes()].concat(),
    )
    .unwrap();
    let outbox = Outbox::open(&path, options()).unwrap();
    let left: Vec<u64> = all(&outbox).await.iter().map(|e| e.seq).collect();
    assert_eq!(left, [8, 9, 10]);
    assert_eq!(outbox.stats().messages, 3);
    // Everything acknowledged: new entries still number after the last one.
    outbox.ack_through(10).unwrap();
    outbox.close();
    let outbox = Outbox::open(&path, options()).unwrap();
    assert_eq!(outbox.stats().messages, 0);
    queued(append(&outbox, 99)).wait().await.unwrap();
    assert_eq!(all(&outbox).await[0].seq, 11, "a seq is never reused");
    outbox.close();
    // A torn or foreign marker means: resend from the oldest entry, never skip.
    std::fs::write(marker_path(&path), b"garbage").unwrap();
    let outbox = Outbox::open(&path, options()).unwrap();
    assert_eq!(all(&outbox).await.len(), 1);
    outbox.close();
}
