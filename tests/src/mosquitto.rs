//! A real Mosquitto broker (Debian's `mosquitto`) on loopback, standing in for the cloud
//! broker of uplink tests. Killed on drop.

use std::{
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct Mosquitto {
    child: Child,
    /// A plain listener for test observers.
    pub plain: SocketAddr,
    /// A TLS listener (server certificate from the given PKI, client certificates
    /// required), when started with one.
    pub tls: Option<SocketAddr>,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Panics with what to do when Debian's mosquitto is missing (the README's test command
/// installs it).
pub fn require_mosquitto() {
    assert!(
        mosquitto_bin().is_some(),
        "the mosquitto broker is not installed: run the README's test command, which \
         installs Debian's mosquitto, or `apt-get install mosquitto`"
    );
}

/// The broker binary: on `PATH`, or where Debian puts it (`/usr/sbin`, not on a normal
/// user's `PATH`).
pub fn mosquitto_bin() -> Option<&'static str> {
    ["mosquitto", "/usr/sbin/mosquitto"]
        .into_iter()
        .find(|bin| {
            Command::new(bin)
                .arg("-h")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
        })
}

impl Mosquitto {
    /// Starts with a plain listener, and a mutual-TLS listener when `pki` is given.
    pub fn start(pki: Option<&crate::pki::Pki>) -> Self {
        Self::start_with(pki, "")
    }

    /// As `start`, with `extra` (lines of mosquitto.conf's global options) added.
    pub fn start_with(pki: Option<&crate::pki::Pki>, extra: &str) -> Self {
        require_mosquitto();
        let dir = tempfile::tempdir().unwrap();
        let plain: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut conf = format!(
            "per_listener_settings false\nallow_anonymous true\npersistence false\n\
             max_inflight_messages 100\nmax_queued_messages 100000\n\
             {extra}listener {} 127.0.0.1\n",
            plain.port()
        );
        let tls = pki.map(|pki| {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            conf.push_str(&format!(
                "listener {} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
                addr.port(),
                pki.ca.display(),
                pki.server_cert.display(),
                pki.server_key.display()
            ));
            addr
        });
        let path = dir.path().join("mosquitto.conf");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(conf.as_bytes())
            .unwrap();
        let child = spawn(&path, dir.path());
        let mosquitto = Self {
            child,
            plain,
            tls,
            _dir: dir,
        };
        mosquitto.wait_listening();
        mosquitto
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for addr in std::iter::once(self.plain).chain(self.tls) {
            while TcpStream::connect(addr).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "mosquitto did not listen on {addr}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn spawn(conf: &Path, dir: &Path) -> Child {
    Command::new(mosquitto_bin().expect("mosquitto installed"))
        .arg("-c")
        .arg(conf)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mosquitto")
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
