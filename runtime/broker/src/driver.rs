//! The kernel interface the network threads (MQTT workers, uplink clients) do their I/O
//! through: ntex's own event loop over epoll or over io_uring, chosen by
//! `gateway.io_driver`.
//!
//! Measured with the broker benchmark on one core (see README): epoll leads where many
//! publishers send to few subscribers (fan-in, QoS 1 about 15% ahead), io_uring where
//! one publisher's messages go to many subscribers (fan-out about 15% ahead) and it drops
//! a connection's write page once sent (about 11 instead of 15 KiB per idle connection).

use std::{any::Any, panic};

use ntex::rt::{BlockFuture, Reactor, Runner, Runtime};

/// Which kernel interface the network threads use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoDriver {
    /// Readiness polling (epoll): the default.
    #[default]
    Epoll,
    /// Completion-based io_uring; where the kernel refuses it (too old, or disabled by
    /// `kernel.io_uring_disabled` or a seccomp filter), epoll with a warning.
    IoUring,
}

/// Submission queue entries of an io_uring thread (ntex's own default).
const URING_ENTRIES: u32 = 2048;

impl IoDriver {
    fn reactor(self) -> std::io::Result<Box<dyn Reactor>> {
        if self == Self::IoUring {
            match ntex::rt::uring::Reactor::new(URING_ENTRIES) {
                Ok(reactor) => {
                    tracing::debug!(driver = "io_uring", "Network event loop started.");
                    return Ok(Box::new(reactor));
                }
                Err(error) => tracing::warn!(
                    %error,
                    "io_uring is not available; using epoll (set gateway.io_driver: epoll to \
                     silence this)."
                ),
            }
        }
        let reactor = ntex::rt::polling::Reactor::new()?;
        tracing::debug!(driver = "epoll", "Network event loop started.");
        Ok(Box::new(reactor))
    }
}

impl Runner for IoDriver {
    fn block_on(&self, fut: BlockFuture) -> Result<(), Box<dyn Any + Send>> {
        let reactor = self.reactor().map_err(|error| -> Box<dyn Any + Send> {
            Box::new(format!("cannot start the network event loop: {error}"))
        })?;
        ntex::rt::with_reactor(&reactor, || {
            panic::catch_unwind(panic::AssertUnwindSafe(|| {
                let runtime = Runtime::new(reactor.handle());
                runtime.block_on(fut, &*reactor);
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::IoDriver;

    /// Both drivers run an ntex system whose tasks, timers and blocking pool work.
    #[test]
    fn each_driver_runs_tasks_timers_and_blocking_work() {
        for driver in [IoDriver::Epoll, IoDriver::IoUring] {
            let answer = ntex::rt::System::new("driver-test", driver).block_on(async {
                let task = ntex::rt::spawn(async { 20 });
                ntex::time::sleep(ntex::time::Millis(5)).await;
                let blocking = ntex::rt::spawn_blocking(|| 22).await.unwrap();
                task.await.unwrap() + blocking
            });
            assert_eq!(answer, 42, "{driver:?}");
        }
    }
}
