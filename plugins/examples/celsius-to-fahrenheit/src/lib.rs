//! Converts one numeric field of a JSON object from °C to °F and marks the unit:
//! `{"temp": 20.0}` → `{"temp": 68.0, "unit": "F"}`. The field's name comes from the config:
//! `{"field": "temp"}`. A payload that is not a JSON object with that numeric field is an
//! error (the message goes to the dead-letter topic).

use edgegw_plugin_sdk::{Error, Message, Output, serde_json::Value};
use std::cell::RefCell;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Name of the field holding degrees Celsius.
    field: String,
}

thread_local! {
    static FIELD: RefCell<String> = RefCell::new("temp".to_owned());
}

#[edgegw_plugin_sdk::init]
fn init(config: Config) -> Result<(), String> {
    if config.field.is_empty() {
        return Err("field must not be empty".to_owned());
    }
    FIELD.with(|f| *f.borrow_mut() = config.field);
    Ok(())
}

#[edgegw_plugin_sdk::rule]
fn on_message(msg: Message) -> Result<Vec<Output>, Error> {
    let mut value: Value = msg.json()?;
    FIELD.with(|field| {
        let field = field.borrow();
        let object = value
            .as_object_mut()
            .ok_or_else(|| Error::new("payload is not a JSON object"))?;
        let celsius = object
            .get(field.as_str())
            .and_then(Value::as_f64)
            .ok_or_else(|| Error::new(format!("field {field:?} is missing or not a number")))?;
        object.insert(field.clone(), Value::from(celsius * 9.0 / 5.0 + 32.0));
        object.insert("unit".to_owned(), Value::from("F"));
        Ok(vec![Output::json(&value)?])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn convert(field: &str, payload: &str) -> Result<Vec<Output>, Error> {
        init(Config {
            field: field.to_owned(),
        })
        .unwrap();
        on_message(Message::new("sensors/kitchen/temp", payload))
    }

    #[test]
    fn converts_the_configured_field() {
        let out = convert("temp", r#"{"temp": 20.0}"#).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic, None);
        assert_eq!(out[0].payload, br#"{"temp":68.0,"unit":"F"}"#);

        let out = convert("t", r#"{"t": -40, "room": "cellar"}"#).unwrap();
        assert_eq!(
            out[0].json_value().unwrap(),
            json!({"t": -40.0, "unit": "F", "room": "cellar"})
        );
        let out = convert("t", r#"{"t": 100}"#).unwrap();
        assert_eq!(out[0].json_value().unwrap()["t"], json!(212.0));
    }

    #[test]
    fn errors_name_the_topic() {
        for (payload, why) in [
            ("not json", "JSON"),
            ("[1, 2]", "not a JSON object"),
            (r#"{"humidity": 40}"#, "\"temp\" is missing"),
            (r#"{"temp": "warm"}"#, "not a number"),
        ] {
            let e = convert("temp", payload).unwrap_err();
            assert_eq!(e.topic(), Some("sensors/kitchen/temp"), "{payload}");
            assert!(e.to_string().contains(why), "{payload}: {e}");
        }
    }

    #[test]
    fn config_is_checked() {
        assert!(
            init(Config {
                field: String::new()
            })
            .is_err()
        );
        let e = edgegw_plugin_sdk::__private::init("{}", init).unwrap_err();
        assert!(e.contains("missing field `field`"), "{e}");
        let e = edgegw_plugin_sdk::__private::init(r#"{"field":"t","x":1}"#, init).unwrap_err();
        assert!(e.contains("unknown field `x`"), "{e}");
    }
}
