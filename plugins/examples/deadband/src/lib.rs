//! Drops readings that changed less than `delta` since the last reading forwarded on the same
//! topic; forwards the others unchanged. The first reading of a topic is always forwarded.
//!
//! Config: `{"field": "temp", "delta": 0.5}`. Without `field` the whole payload is the number
//! (`21.5`). State lives in the instance's memory (one instance per pipeline stage, reused for
//! every message), at most `max_topics` topics (default 10000; the oldest-seen is forgotten).

use edgegw_plugin_sdk::{Error, Message, Output};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    field: Option<String>,
    delta: f64,
    #[serde(default = "default_max_topics")]
    max_topics: usize,
}

fn default_max_topics() -> usize {
    10_000
}

struct State {
    field: Option<String>,
    delta: f64,
    max_topics: usize,
    /// Last forwarded value per topic.
    last: HashMap<String, f64>,
    /// Topics in the order they were first seen, to forget the oldest.
    order: VecDeque<String>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

#[edgegw_plugin_sdk::init]
fn init(config: Config) -> Result<(), String> {
    if !(config.delta >= 0.0 && config.delta.is_finite()) {
        return Err(format!("delta must be ≥ 0, got {}", config.delta));
    }
    if config.max_topics == 0 {
        return Err("max_topics must be ≥ 1".to_owned());
    }
    STATE.with(|s| {
        *s.borrow_mut() = Some(State {
            field: config.field,
            delta: config.delta,
            max_topics: config.max_topics,
            last: HashMap::new(),
            order: VecDeque::new(),
        });
    });
    Ok(())
}

#[edgegw_plugin_sdk::rule]
fn on_message(msg: Message) -> Result<Vec<Output>, Error> {
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        let state = state
            .as_mut()
            .ok_or_else(|| Error::new("not initialised"))?;
        let payload: serde_json::Value = msg.json()?;
        let value = match &state.field {
            Some(field) => payload.get(field),
            None => Some(&payload),
        }
        .and_then(serde_json::Value::as_f64)
        .ok_or_else(|| match &state.field {
            Some(field) => Error::new(format!("field {field:?} is missing or not a number")),
            None => Error::new("payload is not a number"),
        })?;

        match state.last.get_mut(&msg.topic) {
            Some(last) if (value - *last).abs() < state.delta => return Ok(Vec::new()),
            Some(last) => *last = value,
            None => {
                if state.order.len() >= state.max_topics
                    && let Some(oldest) = state.order.pop_front()
                {
                    state.last.remove(&oldest);
                }
                state.order.push_back(msg.topic.clone());
                state.last.insert(msg.topic.clone(), value);
            }
        }
        Ok(vec![msg.into()])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(config: &str) {
        edgegw_plugin_sdk::__private::init(config, init).unwrap();
    }

    fn forwarded(topic: &str, payload: &str) -> bool {
        let out = on_message(Message::new(topic, payload)).unwrap();
        assert!(out.len() <= 1);
        if let Some(o) = out.first() {
            assert_eq!(o, &Output::new(payload), "forwarded unchanged");
        }
        !out.is_empty()
    }

    #[test]
    fn drops_small_changes_since_the_last_forwarded() {
        setup(r#"{"field": "temp", "delta": 0.5}"#);
        let readings = [20.0, 20.2, 20.4, 20.5, 20.9, 21.0, 20.6, 20.4];
        let got: Vec<bool> = readings
            .iter()
            .map(|v| forwarded("s/a", &format!(r#"{{"temp": {v}}}"#)))
            .collect();
        // 20.4 is dropped (0.4 from 20.0), 20.5 passes (0.5), 20.9 dropped (0.4 from 20.5),
        // 21.0 passes; 20.6 dropped (0.4 from 21.0); 20.4 passes (0.6).
        assert_eq!(got, [true, false, false, true, false, true, false, true]);
    }

    #[test]
    fn state_is_per_topic_and_bare_numbers_work() {
        setup(r#"{"delta": 1}"#);
        assert!(forwarded("s/a", "10"));
        assert!(forwarded("s/b", "10.5"));
        assert!(!forwarded("s/a", "10.5"));
        assert!(!forwarded("s/b", "11"));
        assert!(forwarded("s/a", "9"));
    }

    #[test]
    fn forgets_the_oldest_topic_beyond_max_topics() {
        setup(r#"{"delta": 1, "max_topics": 2}"#);
        assert!(forwarded("a", "1"));
        assert!(forwarded("b", "1"));
        assert!(forwarded("c", "1")); // forgets a
        assert!(!forwarded("b", "1"));
        assert!(forwarded("a", "1"));
    }

    #[test]
    fn bad_input_is_an_error_naming_the_topic() {
        setup(r#"{"field": "temp", "delta": 1}"#);
        let e = on_message(Message::new("s/x", r#"{"temp": "hot"}"#)).unwrap_err();
        assert_eq!(e.topic(), Some("s/x"));
        let e = edgegw_plugin_sdk::__private::init(r#"{"delta": -1}"#, init).unwrap_err();
        assert!(e.contains("delta"), "{e}");
    }
}
