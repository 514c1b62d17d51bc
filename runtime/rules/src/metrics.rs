//! The metrics of one stage, registered once so that a call only bumps handles.

use edgegw_telemetry::names::{RULES_CALL_DURATION, RULES_INSTANCE_RESTARTS, RULES_INVOCATIONS};
use metrics::{Counter, Histogram, counter, histogram};
use std::time::Duration;

pub(crate) struct StageMetrics {
    ok: Counter,
    error: Counter,
    trap: Counter,
    timeout: Counter,
    limit: Counter,
    restarts: Counter,
    duration: Histogram,
}

impl StageMetrics {
    pub(crate) fn new(pipeline: &str, plugin: &str) -> Self {
        let invocations = |result: &'static str| {
            counter!(
                RULES_INVOCATIONS,
                "pipeline" => pipeline.to_owned(),
                "plugin" => plugin.to_owned(),
                "result" => result
            )
        };
        Self {
            ok: invocations("ok"),
            error: invocations("error"),
            trap: invocations("trap"),
            timeout: invocations("timeout"),
            limit: invocations("limit"),
            restarts: counter!(
                RULES_INSTANCE_RESTARTS,
                "pipeline" => pipeline.to_owned(),
                "plugin" => plugin.to_owned()
            ),
            duration: histogram!(RULES_CALL_DURATION, "plugin" => plugin.to_owned()),
        }
    }

    /// `n` messages' invocations with their `result` label (see `RuleError::result`).
    pub(crate) fn invocations(&self, result: &str, n: u64) {
        match result {
            "ok" => &self.ok,
            "trap" => &self.trap,
            "timeout" => &self.timeout,
            "limit" => &self.limit,
            _ => &self.error,
        }
        .increment(n);
    }

    /// The time per message of one call: recorded once per call, even for a batch (an
    /// observation per message would cost as much as a no-op rule's call).
    pub(crate) fn duration(&self, per_message: Duration) {
        self.duration.record(per_message.as_secs_f64());
    }

    pub(crate) fn restart(&self) {
        self.restarts.increment(1);
    }
}
