//! Authentication and ACLs against the real binary: password files made with
//! `edgegw passwd`, CONNACK codes for both protocol versions, the per-address limit on
//! failed logins, ACL denials on publish and subscribe (with `%u`/`%c`), and TLS client
//! certificates whose CN is the user name (mosquitto clients).

use std::{
    collections::VecDeque,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use edgegw_tests::{
    Gateway, binary,
    raw::{self, Publish, Raw},
    require_mosquitto_clients,
};

const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Helpers.

/// Runs `edgegw` with `stdin` as standard input; kills it (and fails) after 30 s.
fn edgegw_with_stdin(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(binary())
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn edgegw");
    // A refusal may come before the child reads its input (a user name with `:`): if it has
    // exited already, the write fails with a broken pipe; its output says what happened.
    if let Err(error) = child.stdin.take().unwrap().write_all(stdin) {
        assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe, "{error}");
    }
    finish(child, Duration::from_secs(30))
}

/// Waits for a child with a deadline, collecting its output.
fn finish(child: std::process::Child, timeout: Duration) -> Output {
    edgegw_tests::finish_within(child, timeout, "process")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A password file made with `edgegw passwd`, one call per user.
fn password_file(dir: &Path, users: &[(&str, &str)]) -> PathBuf {
    let path = dir.join("passwd");
    for (user, password) in users {
        let out = edgegw_with_stdin(
            &["passwd", path.to_str().unwrap(), user],
            format!("{password}\n").as_bytes(),
        );
        assert!(out.status.success(), "edgegw passwd: {}", text(&out.stderr));
    }
    path
}

fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    out.extend(raw::varint(body.len()));
    out.extend_from_slice(body);
    out
}

/// MQTT 3.1.1 CONNECT (clean session) with optional user name and password.
fn connect_v3(client_id: &str, user: Option<&str>, password: Option<&str>) -> Vec<u8> {
    let mut flags = 0x02;
    if user.is_some() {
        flags |= 0x80;
    }
    if password.is_some() {
        flags |= 0x40;
    }
    let mut body = raw::string("MQTT");
    body.extend([4, flags]);
    body.extend(30u16.to_be_bytes());
    body.extend(raw::string(client_id));
    body.extend(user.map(raw::string).unwrap_or_default());
    body.extend(password.map(raw::string).unwrap_or_default());
    packet(0x10, &body)
}

/// MQTT 5 CONNECT (clean start) with optional user name and password.
fn connect_v5(client_id: &str, user: Option<&str>, password: Option<&str>) -> Vec<u8> {
    let mut flags = 0x02;
    if user.is_some() {
        flags |= 0x80;
    }
    if password.is_some() {
        flags |= 0x40;
    }
    let mut body = raw::string("MQTT");
    body.extend([5, flags]);
    body.extend(30u16.to_be_bytes());
    body.push(0); // no properties
    body.extend(raw::string(client_id));
    body.extend(user.map(raw::string).unwrap_or_default());
    body.extend(password.map(raw::string).unwrap_or_default());
    packet(0x10, &body)
}

/// Connects and returns the CONNACK return code (v3) or reason code (v5), with the
/// connection.
fn login(
    addr: std::net::SocketAddr,
    v5: bool,
    client_id: &str,
    user: Option<&str>,
    password: Option<&str>,
) -> (u8, Raw) {
    let mut client = Raw::connect(addr);
    client.send(&if v5 {
        connect_v5(client_id, user, password)
    } else {
        connect_v3(client_id, user, password)
    });
    let ack = client.read(WAIT).expect("a CONNACK");
    assert_eq!(ack.kind(), raw::CONNACK, "{ack:?}");
    (ack.body[1], client)
}

/// A connected client that keeps packets it was not waiting for.
struct Client {
    raw: Raw,
    v5: bool,
    stash: VecDeque<raw::Packet>,
}

/// A connected client, asserting success.
fn client(gw: &Gateway, v5: bool, id: &str, user: Option<&str>, password: Option<&str>) -> Client {
    let (code, raw) = login(gw.mqtt, v5, id, user, password);
    assert_eq!(code, 0, "{id} should connect");
    Client {
        raw,
        v5,
        stash: VecDeque::new(),
    }
}

impl Client {
    fn send(&mut self, bytes: &[u8]) {
        self.raw.send(bytes);
    }

    /// The next packet of `kind`, earlier ones of other kinds kept for later.
    fn expect(&mut self, kind: u8, what: &str) -> raw::Packet {
        if let Some(i) = self.stash.iter().position(|p| p.kind() == kind) {
            return self.stash.remove(i).unwrap();
        }
        let (packet, others) = self.raw.read_kind(kind, WAIT);
        self.stash.extend(others);
        packet.unwrap_or_else(|| panic!("no {what} within {WAIT:?}"))
    }

    /// SUBSCRIBE one filter at QoS 1; the SUBACK return/reason code.
    fn subscribe(&mut self, packet_id: u16, filter: &str) -> u8 {
        self.send(&if self.v5 {
            raw::subscribe_v5(packet_id, filter, 1, &[])
        } else {
            raw::subscribe_v3(packet_id, filter, 1)
        });
        let ack = self.expect(raw::SUBACK, "SUBACK");
        assert_eq!(&ack.body[..2], &packet_id.to_be_bytes(), "{ack:?}");
        // v5: packet id, empty properties, then the code.
        *ack.body.last().unwrap()
    }

    /// PUBLISH at QoS 1 or 2; the PUBACK/PUBREC reason code (0 when omitted, as in v3).
    /// QoS 2 is completed with PUBREL/PUBCOMP unless refused.
    fn publish(&mut self, qos: u8, packet_id: u16, topic: &str) -> u8 {
        self.send(&if self.v5 {
            raw::publish_v5(topic, qos, packet_id, &[], topic.as_bytes())
        } else {
            raw::publish_v3(topic, qos, packet_id, false, topic.as_bytes())
        });
        let ack = if qos == 1 {
            self.expect(raw::PUBACK, "PUBACK")
        } else {
            self.expect(raw::PUBREC, "PUBREC")
        };
        assert_eq!(&ack.body[..2], &packet_id.to_be_bytes(), "{ack:?}");
        let code = ack.body.get(2).copied().unwrap_or(0);
        if qos == 2 && code < 0x80 {
            self.send(&raw::ack(raw::PUBREL, packet_id));
            self.expect(raw::PUBCOMP, "PUBCOMP");
        }
        code
    }

    /// QoS 0 PUBLISH.
    fn publish_qos0(&mut self, topic: &str) {
        self.send(&if self.v5 {
            raw::publish_v5(topic, 0, 0, &[], topic.as_bytes())
        } else {
            raw::publish_v3(topic, 0, 0, false, topic.as_bytes())
        });
    }

    /// The topic of the next PUBLISH this client receives.
    fn next_topic(&mut self) -> String {
        let packet = self.expect(raw::PUBLISH, "PUBLISH");
        Publish::parse(&packet, self.v5).topic
    }
}

// ---------------------------------------------------------------------------------------
// Password files.

#[test]
fn passwords_are_checked_and_anonymous_clients_refused() {
    let dir = tempfile::tempdir().unwrap();
    let users = password_file(dir.path(), &[("alice", "alice-pw"), ("bob", "b0b pass")]);
    let gw = Gateway::start_with(
        &format!(
            "  auth:\n    allow_anonymous: false\n    password_file: {}\n    max_failures: 100\n",
            users.display()
        ),
        "",
    );
    for v5 in [false, true] {
        let (bad_credentials, not_authorized) = if v5 { (0x86, 0x87) } else { (0x04, 0x05) };
        let tag = if v5 { "v5" } else { "v3" };
        let (code, _) = login(gw.mqtt, v5, "a", Some("alice"), Some("alice-pw"));
        assert_eq!(code, 0, "{tag}: right password");
        let (code, _) = login(gw.mqtt, v5, "b", Some("bob"), Some("b0b pass"));
        assert_eq!(code, 0, "{tag}: a password with a space");
        let (code, _) = login(gw.mqtt, v5, "a", Some("alice"), Some("alice-pW"));
        assert_eq!(code, bad_credentials, "{tag}: wrong password");
        let (code, _) = login(gw.mqtt, v5, "a", Some("alice"), Some("b0b pass"));
        assert_eq!(code, bad_credentials, "{tag}: another user's password");
        let (code, _) = login(gw.mqtt, v5, "m", Some("mallory"), Some("alice-pw"));
        assert_eq!(code, bad_credentials, "{tag}: unknown user");
        let (code, _) = login(gw.mqtt, v5, "a", Some("alice"), None);
        assert_eq!(code, bad_credentials, "{tag}: no password");
        let (code, _) = login(gw.mqtt, v5, "anon", None, None);
        assert_eq!(code, not_authorized, "{tag}: anonymous");
    }

    // A real client with -u/-P.
    require_mosquitto_clients();
    let port = gw.port().to_string();
    let mut watcher = client(&gw, false, "watcher", Some("bob"), Some("b0b pass"));
    assert_eq!(watcher.subscribe(1, "m/#"), 1);
    let pub_with = |password: &str, message: &str| {
        let child = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-t", "m/x"])
            .args(["-u", "alice", "-P", password, "-m", message])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        finish(child, Duration::from_secs(30))
    };
    let out = pub_with("wrong", "refused");
    assert!(!out.status.success(), "wrong password must fail: {out:?}");
    let out = pub_with("alice-pw", "accepted");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let p = watcher.expect(raw::PUBLISH, "PUBLISH");
    assert_eq!(Publish::parse(&p, false).payload, b"accepted");

    for (reason, at_least) in [
        ("wrong_password", 5.0),
        ("unknown_user", 2.0),
        ("no_password", 2.0),
        ("anonymous", 2.0),
    ] {
        let value = gw.metric(&format!(
            "edgegw_broker_auth_failures_total{{reason=\"{reason}\"}}"
        ));
        assert!(value >= at_least, "{reason}: {value}");
    }
    assert_eq!(
        gw.metric("edgegw_broker_auth_failures_total{reason=\"banned\"}"),
        0.0
    );
    // The log names the refused client and reason, never a password.
    assert!(gw.wait_log(WAIT, |line| {
        line["fields"]["message"] == "Connection refused: login failed."
            && line["fields"]["user"] == "mallory"
            && line["fields"]["reason"] == "unknown_user"
    }));
    let logs = serde_json::to_string(&gw.logs()).unwrap();
    assert!(!logs.contains("alice-pw") && !logs.contains("b0b pass"));
}

#[test]
fn passwd_creates_and_updates_the_file() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users");
    let file = path.to_str().unwrap();

    let out = edgegw_with_stdin(&["passwd", file, "alice"], b"first\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("added user `alice`"), "{out:?}");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "created readable by its owner only");
    let first = std::fs::read_to_string(&path).unwrap();
    assert!(
        first.starts_with("alice:$argon2id$v=19$") && first.lines().count() == 1,
        "{first}"
    );
    assert!(!first.contains("first"), "no plaintext");

    let out = edgegw_with_stdin(&["passwd", file, "bob"], b"bob-pw\r\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = edgegw_with_stdin(&["passwd", file, "alice"], b"second\nignored\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("updated user `alice`"),
        "{out:?}"
    );
    let updated = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = updated.lines().collect();
    assert_eq!(lines.len(), 2, "{updated}");
    assert!(lines[0].starts_with("alice:") && lines[0] != first.trim_end());
    assert!(lines[1].starts_with("bob:"));

    // Refusals change nothing.
    for (args, stdin, why) in [
        (
            ["passwd", file, "carol"],
            &b""[..],
            "no password on standard input",
        ),
        (
            ["passwd", file, "carol"],
            &b"\n"[..],
            "the password is empty",
        ),
        (["passwd", file, "ca:rol"], &b"x\n"[..], "contains `:`"),
    ] {
        let out = edgegw_with_stdin(&args, stdin);
        assert_eq!(out.status.code(), Some(1), "{why}: {out:?}");
        assert!(
            text(&out.stderr).contains(why),
            "{why}: {}",
            text(&out.stderr)
        );
    }
    assert_eq!(std::fs::read_to_string(&path).unwrap(), updated);

    let out = edgegw_with_stdin(&["passwd", "--help"], b"");
    assert!(out.status.success());
    let help = text(&out.stdout);
    for needle in [
        "Usage: edgegw passwd <FILE> <USER>",
        "argon2id",
        "standard input",
        "0600",
    ] {
        assert!(
            help.contains(needle),
            "passwd --help lacks {needle:?}:\n{help}"
        );
    }

    // The gateway takes the updated passwords.
    let gw = Gateway::start_with(
        &format!(
            "  auth:\n    allow_anonymous: false\n    password_file: {file}\n    max_failures: 0\n"
        ),
        "",
    );
    assert_eq!(
        login(gw.mqtt, true, "a", Some("alice"), Some("second")).0,
        0
    );
    assert_eq!(
        login(gw.mqtt, true, "a", Some("alice"), Some("first")).0,
        0x86
    );
    assert_eq!(login(gw.mqtt, false, "b", Some("bob"), Some("bob-pw")).0, 0);
}

#[test]
fn a_bad_password_file_stops_the_gateway_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(&users, "# ok\nalice\n").unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "broker:\n  listeners: [ {{ bind: \"127.0.0.1:0\" }} ]\n  auth: {{ password_file: {} }}\nmetrics: {{ bind: \"127.0.0.1:0\" }}\n",
            users.display()
        ),
    )
    .unwrap();
    let child = Command::new(binary())
        .args(["run", "-c", config.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = finish(child, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!("{}:2: expected `user:hash`", users.display())),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------
// Failed-login limit.

#[test]
fn repeated_failures_refuse_the_address_for_a_while() {
    let dir = tempfile::tempdir().unwrap();
    let users = password_file(dir.path(), &[("alice", "right")]);
    let gw = Gateway::start_with(
        &format!(
            "  auth:\n    allow_anonymous: false\n    password_file: {}\n    max_failures: 3\n    failure_window: 3s\n",
            users.display()
        ),
        "",
    );
    // Anonymous refusals do not count towards the limit.
    for _ in 0..4 {
        assert_eq!(login(gw.mqtt, false, "anon", None, None).0, 0x05);
    }
    assert_eq!(
        login(gw.mqtt, false, "a", Some("alice"), Some("right")).0,
        0
    );
    // Three wrong passwords within the window...
    for attempt in 0..3 {
        let (code, _) = login(gw.mqtt, attempt % 2 == 1, "a", Some("alice"), Some("guess"));
        assert!(code == 0x04 || code == 0x86, "attempt {attempt}: {code:#x}");
    }
    // ...and this address is refused, even with the right password.
    let refused_at = Instant::now();
    assert_eq!(
        login(gw.mqtt, false, "a", Some("alice"), Some("right")).0,
        0x05
    );
    assert_eq!(
        login(gw.mqtt, true, "a", Some("alice"), Some("right")).0,
        0x8a,
        "v5: Banned"
    );
    assert_eq!(
        login(gw.mqtt, true, "a", Some("alice"), Some("guess")).0,
        0x8a,
        "no password is checked while refused"
    );
    assert!(
        gw.metric("edgegw_broker_auth_failures_total{reason=\"banned\"}") >= 3.0,
        "refusals are counted"
    );
    assert_eq!(
        gw.metric("edgegw_broker_auth_failures_total{reason=\"wrong_password\"}"),
        3.0,
        "the refused attempts ran no password check"
    );
    assert!(gw.wait_log(WAIT, |line| {
        line["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Too many failed logins"))
    }));

    // After the window the right password works again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, _) = login(gw.mqtt, true, "a", Some("alice"), Some("right"));
        if code == 0 {
            break;
        }
        assert_eq!(code, 0x8a);
        assert!(Instant::now() < deadline, "still refused after the window");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        refused_at.elapsed() >= Duration::from_secs(2),
        "refused for about failure_window, not less: {:?}",
        refused_at.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// ACLs.

#[test]
fn acl_denies_publish_and_subscribe() {
    let gw = Gateway::start_with(
        "  acl:\n    default: allow\n    rules:\n      \
         - { permission: deny, action: subscribe, topics: [ \"test/nosubscribe\" ] }\n      \
         - { permission: deny, action: publish, topics: [ \"readonly/#\" ] }\n",
        "",
    );
    let mut sub3 = client(&gw, false, "sub3", None, None);
    let mut sub5 = client(&gw, true, "sub5", None, None);
    assert_eq!(sub3.subscribe(1, "readonly/#"), 1);
    assert_eq!(sub5.subscribe(1, "readonly/#"), 1);

    // v5: the publisher is told 0x87 Not Authorized; nothing is delivered.
    let mut pub5 = client(&gw, true, "pub5", None, None);
    assert_eq!(pub5.publish(1, 10, "readonly/a"), 0x87);
    assert_eq!(pub5.publish(2, 11, "readonly/b"), 0x87);
    // The packet id of the refused QoS 2 message is free again.
    assert_eq!(pub5.publish(2, 11, "open/b"), 0x10);
    pub5.publish_qos0("readonly/c");
    // v3 cannot refuse: acked as usual (as Mosquitto does), silently dropped.
    let mut pub3 = client(&gw, false, "pub3", None, None);
    assert_eq!(pub3.publish(1, 20, "readonly/d"), 0);
    assert_eq!(pub3.publish(2, 21, "readonly/e"), 0);
    pub3.publish_qos0("readonly/f");
    // Allowed again: this is the first thing the subscribers get.
    assert_eq!(pub3.subscribe(2, "pub3/echo"), 1, "still connected");
    assert_eq!(
        gw.wait_metric(
            "edgegw_broker_acl_denials_total{action=\"publish\"}",
            WAIT,
            |v| v >= 6.0
        ),
        6.0
    );
    // A topic outside `readonly/#` is published, and arrives first: the six denied
    // messages never reached the subscribers.
    let mut open = client(&gw, false, "open", None, None);
    assert_eq!(sub3.subscribe(2, "open/#"), 1);
    assert_eq!(sub5.subscribe(2, "open/#"), 1);
    open.publish_qos0("open/x");
    assert_eq!(sub3.next_topic(), "open/x");
    assert_eq!(sub5.next_topic(), "open/x");

    // SUBSCRIBE: the denied filter, and any filter that could receive it, fail.
    let mut keep = Vec::new();
    for (v5, refused) in [(false, 0x80), (true, 0x87)] {
        let mut c = client(&gw, v5, if v5 { "s5" } else { "s3" }, None, None);
        for (id, filter) in [
            (1, "test/nosubscribe"),
            (2, "test/+"),
            (3, "+/nosubscribe"),
            (4, "#"),
            (5, "$share/g/test/#"),
        ] {
            assert_eq!(c.subscribe(id, filter), refused, "{filter}");
        }
        assert_eq!(c.subscribe(6, "test/other"), 1, "no common topic");
        assert_eq!(c.subscribe(7, "$share/g/test/other"), 1);
        keep.push(c);
    }
    assert_eq!(
        gw.metric("edgegw_broker_acl_denials_total{action=\"subscribe\"}"),
        10.0
    );
    // sub3, sub5: 2 each; pub3: 1; s3, s5: 2 each. Denied filters are not held.
    assert_eq!(gw.metric("edgegw_broker_subscriptions"), 9.0);
}

#[test]
fn acl_substitutes_user_and_client_id() {
    let dir = tempfile::tempdir().unwrap();
    let users = password_file(dir.path(), &[("alice", "a"), ("bob", "b")]);
    let gw = Gateway::start_with(
        &format!(
            "  auth:\n    password_file: {}\n  acl:\n    default: deny\n    rules:\n      \
             - {{ permission: allow, user: \"*\", action: all, topics: [ \"sensors/%u/#\" ] }}\n      \
             - {{ permission: allow, action: all, topics: [ \"clients/%c/#\" ] }}\n      \
             - {{ permission: allow, user: bob, action: subscribe, topics: [ \"sensors/+/temp\" ] }}\n",
            users.display()
        ),
        "",
    );
    // alice: her own namespace only.
    let mut alice = client(&gw, true, "alice-phone", Some("alice"), Some("a"));
    assert_eq!(alice.subscribe(1, "sensors/alice/#"), 1);
    assert_eq!(alice.subscribe(2, "sensors/+/temp"), 0x87);
    assert_eq!(alice.subscribe(3, "sensors/bob/#"), 0x87);
    assert_eq!(alice.subscribe(4, "clients/alice-phone/#"), 1);
    assert_eq!(alice.subscribe(5, "clients/other/#"), 0x87);
    assert_eq!(alice.publish(1, 10, "sensors/bob/temp"), 0x87);
    assert_eq!(alice.publish(1, 11, "sensors/alice/temp"), 0);
    assert_eq!(alice.next_topic(), "sensors/alice/temp");
    assert_eq!(alice.publish(1, 12, "other"), 0x87, "default deny");

    // bob: his namespace plus, for subscribing, every sensor's temperature.
    let mut bob = client(&gw, false, "bob-1", Some("bob"), Some("b"));
    assert_eq!(bob.subscribe(1, "sensors/+/temp"), 1);
    assert_eq!(bob.subscribe(2, "sensors/alice/humidity"), 0x80);
    assert_eq!(alice.publish(1, 13, "sensors/alice/temp"), 0);
    assert_eq!(bob.next_topic(), "sensors/alice/temp");

    // Anonymous: no `%u` namespace; `%c` still applies.
    let mut anon = client(&gw, true, "dev-9", None, None);
    assert_eq!(anon.subscribe(1, "sensors/%u/#"), 0x87);
    assert_eq!(anon.subscribe(2, "sensors//#"), 0x87);
    assert_eq!(anon.subscribe(3, "clients/dev-9/#"), 1);
    assert_eq!(anon.publish(1, 10, "clients/dev-9/status"), 0);
    assert_eq!(anon.next_topic(), "clients/dev-9/status");
    assert_eq!(anon.publish(1, 11, "clients/dev-1/status"), 0x87);

    // A client id with wildcards gains nothing from `%c`.
    let mut sneaky = client(&gw, true, "+", None, None);
    assert_eq!(sneaky.subscribe(1, "clients/+/#"), 0x87);
    assert_eq!(sneaky.publish(1, 10, "clients/dev-9/status"), 0x87);

    // A will the client may not publish refuses the CONNECT.
    let mut willful = Raw::connect(gw.mqtt);
    willful.send(&raw::connect_v5_will(
        "dev-7",
        true,
        30,
        &[],
        &[],
        "sensors/bob/temp",
        b"x",
        0,
        false,
    ));
    let ack = willful.read(WAIT).expect("CONNACK");
    assert_eq!(ack.body[1], 0x87, "{ack:?}");
    let mut allowed = Raw::connect(gw.mqtt);
    allowed.send(&raw::connect_v5_will(
        "dev-7",
        true,
        30,
        &[],
        &[],
        "clients/dev-7/status",
        b"gone",
        0,
        false,
    ));
    assert_eq!(allowed.read(WAIT).expect("CONNACK").body[1], 0);
}

// ---------------------------------------------------------------------------------------
// TLS client certificates.

struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> (Self, rcgen::Certificate, rcgen::KeyPair) {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "edgegw auth test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();

        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let server = params.signed_by(&key, &ca, &ca_key).unwrap();

        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let pki = Self {
            ca: write("ca.pem", ca.pem()),
            server_cert: write("server.pem", server.pem()),
            server_key: write("server.key", key.serialize_pem()),
        };
        (pki, ca, ca_key)
    }

    /// A client certificate signed by the CA; `cn: None` leaves the subject without a CN.
    fn client(
        dir: &Path,
        name: &str,
        cn: Option<&str>,
        ca: &(rcgen::Certificate, rcgen::KeyPair),
    ) -> (PathBuf, PathBuf) {
        use rcgen::{
            CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
        };
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Kitchen");
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca.0, &ca.1).unwrap();
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

#[test]
fn client_certificate_cn_is_the_user_name() {
    require_mosquitto_clients();
    let dir = tempfile::tempdir().unwrap();
    let (pki, ca, ca_key) = Pki::new(dir.path());
    let ca = (ca, ca_key);
    let (sensor_cert, sensor_key) = Pki::client(dir.path(), "sensor", Some("sensor-1"), &ca);
    let (nameless_cert, nameless_key) = Pki::client(dir.path(), "nameless", None, &ca);
    let users = password_file(dir.path(), &[("watcher", "w")]);
    let gw = Gateway::start_with(
        &format!(
            "  auth:\n    allow_anonymous: false\n    password_file: {}\n  acl:\n    default: deny\n    rules:\n      \
             - {{ permission: allow, user: watcher, action: subscribe, topics: [ \"#\" ] }}\n      \
             - {{ permission: allow, user: \"*\", action: publish, topics: [ \"sensors/%u/#\" ] }}\n",
            users.display()
        ),
        &format!(
            "    - bind: 127.0.0.1:0\n      tls:\n        cert: {}\n        key: {}\n        client_ca: {}\n        use_identity_as_username: true\n",
            pki.server_cert.display(),
            pki.server_key.display(),
            pki.ca.display()
        ),
    );
    let tls = gw.mqtts.expect("the TLS listener");
    let mut watcher = client(&gw, false, "watcher", Some("watcher"), Some("w"));
    assert_eq!(watcher.subscribe(1, "sensors/#"), 1);

    let mosquitto_pub = |cert: &Path, key: &Path, topic: &str, extra: &[&str]| {
        let child = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &tls.port().to_string(), "-q", "1"])
            .arg("--cafile")
            .arg(&pki.ca)
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(["-t", topic, "-m", topic])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        finish(child, Duration::from_secs(30))
    };
    // No password needed; the ACL sees the CN as the user name (3.1.1 drops silently).
    let out = mosquitto_pub(&sensor_cert, &sensor_key, "sensors/sensor-2/t", &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = mosquitto_pub(&sensor_cert, &sensor_key, "sensors/sensor-1/t", &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        watcher.next_topic(),
        "sensors/sensor-1/t",
        "the message outside the CN's namespace was dropped"
    );
    assert!(gw.wait_log(WAIT, |line| {
        line["fields"]["message"] == "Client connected." && line["fields"]["user"] == "sensor-1"
    }));
    // User name and password in CONNECT do not override the certificate.
    let out = mosquitto_pub(
        &sensor_cert,
        &sensor_key,
        "sensors/sensor-1/u",
        &["-u", "watcher", "-P", "wrong", "-V", "mqttv5"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(watcher.next_topic(), "sensors/sensor-1/u");

    // A certificate without a CN gives no user name: refused.
    let out = mosquitto_pub(&nameless_cert, &nameless_key, "sensors/x/t", &[]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        text(&out.stderr).to_lowercase().contains("not authori"),
        "{}",
        text(&out.stderr)
    );
    assert!(gw.metric("edgegw_broker_auth_failures_total{reason=\"certificate\"}") >= 1.0);

    // The plain listener still wants a password.
    assert_eq!(login(gw.mqtt, false, "plain", None, None).0, 0x05);
}

// ---------------------------------------------------------------------------------------
// Session ownership.

/// MQTT 3.1.1 CONNECT with clean session 0 and credentials.
fn connect_v3_persistent(client_id: &str, user: &str, password: &str) -> Vec<u8> {
    let mut body = raw::string("MQTT");
    body.extend([4, 0xc0]);
    body.extend(30u16.to_be_bytes());
    body.extend(raw::string(client_id));
    body.extend(raw::string(user));
    body.extend(raw::string(password));
    packet(0x10, &body)
}

/// A persistent session belongs to the user who made it: another user connecting with the
/// same client id gets a new, empty session, never the first user's queued messages.
#[test]
fn a_session_is_resumed_only_by_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let users = password_file(dir.path(), &[("alice", "a-pw"), ("bob", "b-pw")]);
    let gw = Gateway::start_with(
        &format!(
            "  auth:\n    allow_anonymous: false\n    password_file: {}\n",
            users.display()
        ),
        "",
    );
    let persistent = |user: &str, password: &str| {
        let mut c = Raw::connect(gw.mqtt);
        c.send(&connect_v3_persistent("shared-id", user, password));
        let ack = c.read(WAIT).expect("CONNACK");
        assert_eq!(ack.body[1], 0, "{user} connects");
        (c, ack.body[0] & 1 == 1)
    };
    let (mut alice, present) = persistent("alice", "a-pw");
    assert!(!present);
    alice.send(&raw::subscribe_v3(1, "private/alice", 1));
    assert!(alice.read_kind(raw::SUBACK, WAIT).0.is_some());
    drop(alice);
    gw.wait_metric("edgegw_broker_connections{protocol=\"3.1.1\"}", WAIT, |v| {
        v == 0.0
    });

    let mut publisher = client(&gw, false, "pub", Some("alice"), Some("a-pw"));
    assert_eq!(publisher.publish(1, 1, "private/alice"), 0);

    let (mut bob, present) = persistent("bob", "b-pw");
    assert!(!present, "bob must not resume alice's session");
    assert!(
        bob.read(Duration::from_millis(800)).is_none(),
        "bob received alice's queued message"
    );
    drop(bob);
    gw.wait_metric("edgegw_broker_connections{protocol=\"3.1.1\"}", WAIT, |v| {
        v <= 1.0
    });
    // Alice's session ended when bob took the id; she starts fresh too.
    let (_, present) = persistent("alice", "a-pw");
    assert!(!present, "the session was bob's now, not alice's");
}

// ---------------------------------------------------------------------------------------
// Reload.

/// A reload (SIGHUP) takes access away from clients already connected: a user removed from
/// the password file and an anonymous client (once anonymous access is off) are
/// disconnected (v5: DISCONNECT 0x87) without their wills; subscriptions the new ACL denies
/// are removed, from offline persistent sessions too; a user still allowed keeps its
/// connection and its allowed subscriptions.
#[test]
fn reload_revokes_access_no_longer_granted() {
    let dir = tempfile::tempdir().unwrap();
    let users = password_file(dir.path(), &[("alice", "a-pw"), ("bob", "b-pw")]);
    let path = dir.path().join("gateway.yaml");
    let data = dir.path().join("data");
    let config = |anonymous: bool, subscribe: &str| {
        format!(
            "gateway:\n  id: revoke\n  data_dir: {data}\nbroker:\n  listeners:\n    - bind: 127.0.0.1:0\n  auth:\n    allow_anonymous: {anonymous}\n    password_file: {users}\n  acl:\n    default: deny\n    rules:\n      - {{ permission: allow, action: publish, topics: [ \"#\" ] }}\n      - {{ permission: allow, action: subscribe, topics: [ {subscribe} ] }}\nmetrics:\n  bind: 127.0.0.1:0\nlog:\n  level: info\n  format: json\n",
            data = data.display(),
            users = users.display(),
        )
    };
    std::fs::write(&path, config(true, "\"sensors/#\", \"alerts/#\"")).unwrap();
    let gw = Gateway::start_file(&path, dir);

    let mut alice = client(&gw, true, "alice-1", Some("alice"), Some("a-pw"));
    assert_eq!(alice.subscribe(1, "sensors/#"), 1);
    assert_eq!(alice.subscribe(2, "alerts/#"), 1);
    // An offline persistent session of alice's, subscribed to alerts/# too.
    let mut offline = Raw::connect(gw.mqtt);
    offline.send(&connect_v3_persistent("alice-2", "alice", "a-pw"));
    assert_eq!(offline.read(WAIT).expect("CONNACK").body[1], 0);
    offline.send(&raw::subscribe_v3(1, "alerts/#", 1));
    assert_eq!(
        offline.read_kind(raw::SUBACK, WAIT).0.expect("SUBACK").body[2],
        1
    );
    offline.send(&raw::disconnect());
    let mut bob = client(&gw, true, "bob-1", Some("bob"), Some("b-pw"));
    let mut anonymous = Raw::connect(gw.mqtt);
    anonymous.send(&raw::connect_v3_will(
        "anon-1",
        true,
        30,
        "sensors/anon-will",
        b"gone",
        1,
        false,
    ));
    assert_eq!(anonymous.read(WAIT).expect("CONNACK").body[1], 0);

    // bob leaves the password file (alice's line is kept as it is), anonymous access ends,
    // and only sensors/# may be subscribed to.
    let text = std::fs::read_to_string(&users).unwrap();
    let kept: String = text
        .lines()
        .filter(|line| !line.starts_with("bob:"))
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(&users, kept).unwrap();
    std::fs::write(&gw.config, config(false, "\"sensors/#\"")).unwrap();
    let status = Command::new("kill")
        .args(["-HUP", &gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        gw.wait_log(WAIT, |l| l["fields"]["message"]
            == "Broker auth (password file re-read, anonymous access) and ACLs reloaded."
            && l["fields"]["connections_closed"] == 2
            && l["fields"]["subscriptions_removed"] == 2),
        "{:#?}",
        gw.logs()
    );

    // bob: DISCONNECT Not authorized, then closed; the anonymous client: closed.
    let mut seen = Vec::new();
    assert!(
        bob.raw.closed_within(WAIT, &mut seen),
        "bob stays connected"
    );
    let disconnect = seen
        .iter()
        .find(|p| p.kind() == raw::DISCONNECT)
        .unwrap_or_else(|| panic!("no DISCONNECT for bob: {seen:?}"));
    assert_eq!(disconnect.body[0], 0x87, "{disconnect:?}");
    assert!(
        anonymous.closed_within(WAIT, &mut Vec::new()),
        "the anonymous client stays connected"
    );
    // Neither can log in again.
    assert_eq!(
        login(gw.mqtt, true, "bob-1", Some("bob"), Some("b-pw")).0,
        0x86
    );
    assert_eq!(login(gw.mqtt, false, "anon-1", None, None).0, 0x05);

    // alice is still connected: alerts/# is gone, sensors/# stays; no will from the
    // anonymous client came.
    alice.publish(1, 10, "alerts/fire");
    alice.publish(1, 11, "sensors/t");
    assert_eq!(alice.next_topic(), "sensors/t");
    assert!(
        alice.raw.read(Duration::from_millis(500)).is_none(),
        "nothing else arrives"
    );
    // Subscribing to alerts/# again is refused.
    assert_eq!(alice.subscribe(3, "alerts/#"), 0x87);

    // alice's offline session lost alerts/# as well.
    let mut resumed = Raw::connect(gw.mqtt);
    resumed.send(&connect_v3_persistent("alice-2", "alice", "a-pw"));
    let ack = resumed.read(WAIT).expect("CONNACK");
    assert_eq!((ack.body[0] & 1, ack.body[1]), (1, 0), "session present");
    alice.publish(1, 12, "alerts/flood");
    assert!(
        resumed.read(Duration::from_millis(500)).is_none(),
        "alerts/# no longer reaches the resumed session"
    );
}
