//! The last warnings and errors the gateway logged, for the status page (`/status.json`).
//!
//! A `tracing` layer copies every WARN and ERROR event into a small ring (the newest
//! [`CAPACITY`]); the status page shows them so a user sees what went wrong without a shell.

use std::{
    collections::VecDeque,
    fmt::Write as _,
    sync::{Mutex, OnceLock},
    time::{SystemTime, UNIX_EPOCH},
};

use tracing::{Event, Level, Subscriber, field::Field};
use tracing_subscriber::{Layer, layer::Context};

/// How many events the ring keeps.
pub const CAPACITY: usize = 50;
/// Longest message kept per event (bytes); longer ones are cut at a char boundary.
const MAX_MESSAGE: usize = 1024;

/// One logged warning or error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecentEvent {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// `WARN` or `ERROR`.
    pub level: &'static str,
    /// The module that logged it (e.g. `edgegw_uplink::client`).
    pub target: String,
    /// The message followed by its fields as `key=value`.
    pub message: String,
}

fn ring() -> &'static Mutex<VecDeque<RecentEvent>> {
    static RING: OnceLock<Mutex<VecDeque<RecentEvent>>> = OnceLock::new();
    RING.get_or_init(|| Mutex::new(VecDeque::with_capacity(CAPACITY)))
}

/// The kept events, oldest first.
pub fn recent_events() -> Vec<RecentEvent> {
    ring()
        .lock()
        .map(|ring| ring.iter().cloned().collect())
        .unwrap_or_default()
}

fn push(event: RecentEvent) {
    if let Ok(mut ring) = ring().lock() {
        if ring.len() == CAPACITY {
            ring.pop_front();
        }
        ring.push_back(event);
    }
}

/// The layer to add to the gateway's subscriber: it keeps WARN and ERROR events whatever
/// the log filter prints.
pub fn recent_errors_layer<S: Subscriber>() -> impl Layer<S> {
    RecentErrors
}

struct RecentErrors;

impl<S: Subscriber> Layer<S> for RecentErrors {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        let level = if level == Level::ERROR {
            "ERROR"
        } else if level == Level::WARN {
            "WARN"
        } else {
            return;
        };
        let mut visitor = Text::default();
        event.record(&mut visitor);
        let mut message = visitor.message;
        if !visitor.fields.is_empty() {
            if !message.is_empty() {
                message.push(' ');
            }
            message.push_str(&visitor.fields);
        }
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        push(RecentEvent {
            time_ms,
            level,
            target: event.metadata().target().to_string(),
            message,
        });
    }
}

#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl tracing::field::Visit for Text {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.field(field, format_args!("{value}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.field(field, format_args!("{value:?}"));
        }
    }
}

impl Text {
    fn field(&mut self, field: &Field, value: std::fmt::Arguments<'_>) {
        if !self.fields.is_empty() {
            self.fields.push(' ');
        }
        let _ = write!(self.fields, "{}={value}", field.name());
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::prelude::*;

    use super::*;

    #[test]
    fn keeps_warnings_and_errors_newest_last_and_bounded() {
        let subscriber = tracing_subscriber::registry().with(recent_errors_layer());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("not kept");
            tracing::warn!(port = 8883, "first warning");
            for i in 0..CAPACITY {
                tracing::error!(i, reason = "disk full", "error {i}");
            }
        });
        let events = recent_events();
        assert_eq!(events.len(), CAPACITY, "the ring is bounded");
        assert!(events.iter().all(|e| e.level == "ERROR"), "{events:?}");
        let last = events.last().expect("events");
        assert_eq!(
            last.message,
            format!("error {} i={} reason=disk full", CAPACITY - 1, CAPACITY - 1)
        );
        assert!(last.target.contains("recent"), "{}", last.target);
        assert!(last.time_ms > 1_700_000_000_000);
    }
}
