//! Raises an alert when a numeric JSON field crosses a threshold, and clears it when the value
//! is back past the threshold by more than the hysteresis, so a reading that wobbles around
//! the threshold raises one alert, not one per message. State is per input topic, kept in the
//! gateway's kv store, so it survives a re-created instance.
//!
//! Config: `{"field": "temp", "threshold": 30.0, "hysteresis": 1.0, "direction": "above",
//! "alert_topic": "alerts/{topic}"}`. Only alerts are emitted (on `alert_topic`, a topic
//! template: `{topic}`, `{1}`, `{2}`…); readings that cross nothing emit nothing unless
//! `"forward": true`, which also passes every reading on unchanged.

use edgegw_plugin_sdk::{Error, Message, Output, TopicTemplate, kv, log, serde_json::json};
use std::cell::RefCell;

#[derive(serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
enum Direction {
    /// Alert while the value is above the threshold.
    #[default]
    Above,
    /// Alert while the value is below the threshold.
    Below,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    field: String,
    threshold: f64,
    #[serde(default)]
    hysteresis: f64,
    #[serde(default)]
    direction: Direction,
    alert_topic: String,
    #[serde(default)]
    forward: bool,
}

struct Rule {
    field: String,
    threshold: f64,
    hysteresis: f64,
    direction: Direction,
    alert_topic: TopicTemplate,
    forward: bool,
}

thread_local! {
    static RULE: RefCell<Option<Rule>> = const { RefCell::new(None) };
}

#[edgegw_plugin_sdk::init]
fn init(config: Config) -> Result<(), String> {
    if !config.threshold.is_finite() {
        return Err("threshold must be a finite number".to_owned());
    }
    if !(config.hysteresis >= 0.0 && config.hysteresis.is_finite()) {
        return Err(format!("hysteresis must be ≥ 0, got {}", config.hysteresis));
    }
    let alert_topic = TopicTemplate::parse(&config.alert_topic, &[]).map_err(|e| e.to_string())?;
    RULE.with(|r| {
        *r.borrow_mut() = Some(Rule {
            field: config.field,
            threshold: config.threshold,
            hysteresis: config.hysteresis,
            direction: config.direction,
            alert_topic,
            forward: config.forward,
        });
    });
    Ok(())
}

#[edgegw_plugin_sdk::rule]
fn on_message(msg: Message) -> Result<Vec<Output>, Error> {
    RULE.with(|rule| {
        let rule = rule.borrow();
        let rule = rule.as_ref().ok_or_else(|| Error::new("not initialised"))?;
        let payload: serde_json::Value = msg.json()?;
        let value = payload
            .get(&rule.field)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| Error::new(format!("field {:?} is missing or not a number", rule.field)))?;

        // Past the threshold: alerting. Back past threshold ∓ hysteresis: clear. Between the
        // two the state does not change.
        let (beyond, back) = match rule.direction {
            Direction::Above => (
                value > rule.threshold,
                value < rule.threshold - rule.hysteresis,
            ),
            Direction::Below => (
                value < rule.threshold,
                value > rule.threshold + rule.hysteresis,
            ),
        };
        let key = format!("alerting:{}", msg.topic);
        let alerting = kv::get(&key).is_some();
        let mut outputs = Vec::new();
        let change = if !alerting && beyond {
            kv::set(&key, b"1")?;
            Some("alert")
        } else if alerting && back {
            kv::delete(&key);
            Some("clear")
        } else {
            None
        };
        if let Some(state) = change {
            log::info(format!("{}: {state} ({} = {value})", msg.topic, rule.field));
            let alert = json!({
                "state": state,
                "topic": msg.topic,
                "field": rule.field,
                "value": value,
                "threshold": rule.threshold,
                "direction": match rule.direction { Direction::Above => "above", Direction::Below => "below" },
            });
            outputs.push(Output::json(&alert)?.to_topic(rule.alert_topic.render(&msg.topic)?));
        }
        if rule.forward {
            outputs.push(msg.into());
        }
        Ok(outputs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(config: serde_json::Value) {
        kv::clear();
        edgegw_plugin_sdk::__private::init(&config.to_string(), init).unwrap();
    }

    /// The states (`alert`/`clear`) emitted for a series of readings on one topic.
    fn run(topic: &str, readings: &[f64]) -> Vec<Option<String>> {
        readings
            .iter()
            .map(|v| {
                let out = on_message(Message::new(topic, format!(r#"{{"temp": {v}}}"#))).unwrap();
                assert!(out.len() <= 1);
                out.first().map(|o| {
                    assert_eq!(o.topic.as_deref(), Some(format!("alerts/{topic}").as_str()));
                    o.json_value().unwrap()["state"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
            })
            .collect()
    }

    fn s(x: &str) -> Option<String> {
        Some(x.to_owned())
    }

    #[test]
    fn alerts_once_and_clears_past_the_hysteresis() {
        setup(
            json!({"field": "temp", "threshold": 30.0, "hysteresis": 2.0, "alert_topic": "alerts/{topic}"}),
        );
        let states = run(
            "s/a",
            &[25.0, 30.0, 30.5, 31.0, 29.0, 30.5, 28.5, 27.9, 29.0, 30.1],
        );
        assert_eq!(
            states,
            vec![
                None,
                None,
                s("alert"),
                None,
                None,
                None,
                None,
                s("clear"),
                None,
                s("alert")
            ]
        );
    }

    #[test]
    fn below_direction_and_per_topic_state() {
        setup(
            json!({"field": "temp", "threshold": 5.0, "hysteresis": 1.0, "direction": "below", "alert_topic": "alerts/{topic}"}),
        );
        assert_eq!(run("s/a", &[4.0]), vec![s("alert")]);
        // Another topic has its own state.
        assert_eq!(run("s/b", &[6.0, 4.5]), vec![None, s("alert")]);
        assert_eq!(run("s/a", &[4.0, 5.5, 6.1]), vec![None, None, s("clear")]);
    }

    #[test]
    fn alert_payload_and_forwarding() {
        setup(
            json!({"field": "temp", "threshold": 30.0, "alert_topic": "alerts/{2}", "forward": true}),
        );
        let out = on_message(Message::new("sensors/attic/temp", r#"{"temp": 35}"#)).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].topic.as_deref(), Some("alerts/attic"));
        assert_eq!(
            out[0].json_value().unwrap(),
            json!({"state": "alert", "topic": "sensors/attic/temp", "field": "temp", "value": 35.0, "threshold": 30.0, "direction": "above"})
        );
        assert_eq!(out[1], Output::new(r#"{"temp": 35}"#));
        // Forwarded but no new alert.
        let out = on_message(Message::new("sensors/attic/temp", r#"{"temp": 36}"#)).unwrap();
        assert_eq!(out, vec![Output::new(r#"{"temp": 36}"#)]);
    }

    #[test]
    fn bad_input_and_config() {
        setup(json!({"field": "temp", "threshold": 30.0, "alert_topic": "a/{topic}"}));
        let e = on_message(Message::new("s/x", r#"{"hum": 1}"#)).unwrap_err();
        assert_eq!(e.topic(), Some("s/x"));
        let e = edgegw_plugin_sdk::__private::init(
            r#"{"field":"t","threshold":1,"hysteresis":-1,"alert_topic":"a"}"#,
            init,
        )
        .unwrap_err();
        assert!(e.contains("hysteresis"), "{e}");
        let e = edgegw_plugin_sdk::__private::init(
            r#"{"field":"t","threshold":1,"alert_topic":"a/{x}"}"#,
            init,
        )
        .unwrap_err();
        assert!(e.contains("unknown placeholder"), "{e}");
    }
}
