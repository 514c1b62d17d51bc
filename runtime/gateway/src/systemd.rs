//! systemd integration without a library: `sd_notify` messages (`READY=1`, `RELOADING=1`,
//! `STOPPING=1`, `STATUS=…`, `WATCHDOG=1`) on the datagram socket named by `NOTIFY_SOCKET`,
//! for a `Type=notify` unit with `WatchdogSec=`. Outside systemd (no `NOTIFY_SOCKET`) every
//! call does nothing.

use std::{
    os::unix::net::{SocketAddr, UnixDatagram},
    time::Duration,
};

/// Where to send notifications, read once from the environment at start.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. A socket that cannot be
    /// used is logged once; the gateway runs on without notifications.
    pub fn from_env() -> Self {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            match socket_addr(&path).and_then(|addr| Ok((UnixDatagram::unbound()?, addr))) {
                Ok(target) => Some(target),
                Err(error) => {
                    tracing::warn!(socket = %path, %error, "Cannot use NOTIFY_SOCKET; no systemd notifications.");
                    None
                }
            }
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|usec| *usec > 0 && for_us)
            .map(Duration::from_micros);
        Self { target, watchdog }
    }

    /// Sends one notification (`KEY=value` lines). Failures are logged at debug: systemd
    /// going away must not disturb the gateway.
    pub fn notify(&self, state: &str) {
        if let Some((socket, addr)) = &self.target
            && let Err(error) = socket.send_to_addr(state.as_bytes(), addr)
        {
            tracing::debug!(%error, state, "sd_notify failed.");
        }
    }

    /// The watchdog period systemd asked for (`WatchdogSec=`), if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.target.is_some())
    }
}

/// `/run/...` paths and Linux abstract sockets (`@name`).
fn socket_addr(path: &str) -> std::io::Result<SocketAddr> {
    if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt as _;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else {
        SocketAddr::from_pathname(path)
    }
}
