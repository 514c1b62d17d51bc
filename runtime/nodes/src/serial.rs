//! A serial link: open, run the gateway, and reopen with backoff when that fails.

use std::time::Duration;

use rand::Rng as _;
use tokio_serial::SerialPortBuilderExt as _;
use tokio_util::sync::CancellationToken;

use crate::{LinkError, SerialSettings, gateway::Context};

/// Exponential backoff with jitter: each delay is drawn from [d/2, d], d doubling per
/// failure from `min` up to `max`, so links that fail together do not retry in lockstep.
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Self {
            min,
            max: max.max(min),
            current: min,
        }
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        let floor = ceiling / 2;
        rand::rng().random_range(floor..=ceiling)
    }
}

pub async fn run(
    settings: SerialSettings,
    mut backoff: Backoff,
    context: Context,
    cancel: CancellationToken,
) {
    let port = settings.port.as_str();
    // Warn once per outage, not at every attempt.
    let mut failing = false;
    let mut opened_before = false;
    loop {
        let opened = tokio_serial::new(port, settings.baud)
            .open_native_async()
            .map_err(|source| LinkError::Open {
                port: port.to_owned(),
                baud: settings.baud,
                source,
            });
        let result = match opened {
            Ok(stream) => {
                if opened_before {
                    context.metrics.link_reconnects.increment(1);
                }
                opened_before = true;
                failing = false;
                backoff.reset();
                tracing::info!(port, baud = settings.baud, "Serial node link open.");
                context.metrics.links_up.increment(1.0);
                let result = crate::gateway::run_link(stream, port, &context, &cancel).await;
                context.metrics.links_up.decrement(1.0);
                result
            }
            Err(error) => Err(error),
        };
        match result {
            Ok(()) => {
                tracing::info!(port, "Serial node link stopped.");
                return;
            }
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(port, %error, "Serial node link down; retrying with backoff.");
            }
            Err(error) => tracing::debug!(port, %error, "Serial node link still down."),
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_maximum() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let mut ceiling = Duration::from_millis(100);
        for _ in 0..10 {
            let delay = backoff.next_delay();
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "{delay:?} vs {ceiling:?}"
            );
            ceiling = (ceiling * 2).min(Duration::from_millis(800));
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
