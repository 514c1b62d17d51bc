//! Adds the gateway's id and a timestamp to a JSON payload and maps the topic through a
//! template.
//!
//! Config: `{"gateway_id": "pi-kitchen", "topic": "site1/{gateway_id}/{topic}"}` and
//! optionally `"gateway_field"` (default `"gateway"`) and `"timestamp_field"` (default `"ts"`,
//! milliseconds since the Unix epoch). The template knows `{topic}`, `{1}`, `{2}`… and
//! `{gateway_id}`; without `topic` the topic is kept. A JSON object gets the two fields; any
//! other JSON value is wrapped as `{"value": …}` first; a payload that is not JSON is an error.

use edgegw_plugin_sdk::{Error, Message, Output, TopicTemplate, clock, serde_json::Value};
use std::cell::RefCell;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    gateway_id: String,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default = "default_gateway_field")]
    gateway_field: String,
    #[serde(default = "default_timestamp_field")]
    timestamp_field: String,
}

fn default_gateway_field() -> String {
    "gateway".to_owned()
}

fn default_timestamp_field() -> String {
    "ts".to_owned()
}

struct Rule {
    gateway_id: String,
    topic: Option<TopicTemplate>,
    gateway_field: String,
    timestamp_field: String,
}

thread_local! {
    static RULE: RefCell<Option<Rule>> = const { RefCell::new(None) };
}

#[edgegw_plugin_sdk::init]
fn init(config: Config) -> Result<(), String> {
    if config.gateway_id.is_empty() {
        return Err("gateway_id must not be empty".to_owned());
    }
    let topic = config
        .topic
        .map(|t| TopicTemplate::parse(&t, &[("gateway_id", &config.gateway_id)]))
        .transpose()
        .map_err(|e| e.to_string())?;
    RULE.with(|r| {
        *r.borrow_mut() = Some(Rule {
            gateway_id: config.gateway_id,
            topic,
            gateway_field: config.gateway_field,
            timestamp_field: config.timestamp_field,
        });
    });
    Ok(())
}

#[edgegw_plugin_sdk::rule]
fn on_message(msg: Message) -> Result<Vec<Output>, Error> {
    RULE.with(|rule| {
        let rule = rule.borrow();
        let rule = rule.as_ref().ok_or_else(|| Error::new("not initialised"))?;
        let mut object = match msg.json_value()? {
            Value::Object(object) => object,
            other => {
                let mut object = serde_json::Map::new();
                object.insert("value".to_owned(), other);
                object
            }
        };
        object.insert(
            rule.gateway_field.clone(),
            Value::from(rule.gateway_id.as_str()),
        );
        object.insert(rule.timestamp_field.clone(), Value::from(clock::now_ms()));
        let mut output = Output::json(&object)?;
        if let Some(template) = &rule.topic {
            output = output.to_topic(template.render(&msg.topic)?);
        }
        Ok(vec![output])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn setup(config: Value) {
        clock::set_fixed_now_ms(Some(1_700_000_000_123));
        edgegw_plugin_sdk::__private::init(&config.to_string(), init).unwrap();
    }

    #[test]
    fn adds_gateway_and_timestamp_and_maps_the_topic() {
        setup(json!({"gateway_id": "pi-kitchen", "topic": "site1/{gateway_id}/{2}/{topic}"}));
        let out = on_message(Message::new("sensors/attic/temp", r#"{"temp": 21.5}"#)).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].topic.as_deref(),
            Some("site1/pi-kitchen/attic/sensors/attic/temp")
        );
        assert_eq!(
            out[0].json_value().unwrap(),
            json!({"temp": 21.5, "gateway": "pi-kitchen", "ts": 1_700_000_000_123u64})
        );
    }

    #[test]
    fn wraps_non_objects_keeps_topic_and_renames_fields() {
        setup(json!({"gateway_id": "gw", "gateway_field": "gw", "timestamp_field": "time"}));
        let out = on_message(Message::new("a/b", "42")).unwrap();
        assert_eq!(out[0].topic, None);
        assert_eq!(
            out[0].json_value().unwrap(),
            json!({"value": 42, "gw": "gw", "time": 1_700_000_000_123u64})
        );
    }

    #[test]
    fn errors() {
        setup(json!({"gateway_id": "gw", "topic": "x/{3}"}));
        let e = on_message(Message::new("a/b", "{}")).unwrap_err();
        assert_eq!(e.topic(), Some("a/b"));
        assert!(e.message().contains("fewer than 3 levels"), "{e}");
        let e = on_message(Message::new("a/b/c", "not json")).unwrap_err();
        assert_eq!(e.topic(), Some("a/b/c"));
        let e =
            edgegw_plugin_sdk::__private::init(r#"{"gateway_id": "gw", "topic": "{site}"}"#, init)
                .unwrap_err();
        assert!(e.contains("unknown placeholder {site}"), "{e}");
    }
}
