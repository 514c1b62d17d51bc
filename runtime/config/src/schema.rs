//! The JSON Schema of `gateway.yaml`, generated from the config types;
//! `configs/gateway.schema.json` is its output (a test keeps them equal). Editors use it
//! through yaml-language-server for completion, descriptions and errors as you type;
//! `edgegw check` stays the authority.
//!
//! The derived schema describes the Rust types; a few adjustments make it describe what the
//! loader accepts from YAML:
//! - where text is expected, `serde_norway` takes any scalar as its text (`password: 1234`),
//!   so plain string schemas also allow numbers and booleans;
//! - a key with nothing after it (`limits:` with every line under it commented out) is an
//!   empty mapping or list to the loader but null in JSON, so keys holding a mapping or a
//!   list also allow null (an explicit `~` there is an error in the loader, not in the schema);
//! - the whole file may be empty (the defaults);
//! - a key whose doc comment is on its type gets that as its own description too.

use schemars::{Schema, SchemaGenerator, generate::SchemaSettings, json_schema};
use serde_json::{Map, Value};

use crate::Config;

/// The JSON Schema (draft 2020-12) of the config file, as pretty JSON ending in a newline;
/// the same text on every call. `configs/gateway.schema.json` holds it.
pub fn json_schema() -> String {
    let mut root = derived_schema();
    let object = root.as_object_mut().expect("a root schema is an object");
    object.insert("title".into(), "edgegw gateway.yaml".into());
    object.insert("type".into(), serde_json::json!(["object", "null"]));
    let definitions = object.get("$defs").cloned().unwrap_or_default();
    adjust(&mut root, &definitions);
    let mut text = serde_json::to_string_pretty(&sorted(root)).expect("JSON values serialize");
    text.push('\n');
    text
}

/// Every key the config file has, as a dotted path from the top (`broker.auth.allow_anonymous`;
/// a list's items as `[]`: `broker.listeners[].bind`), from the schema. Error messages use it
/// to say where a key that is unknown in one place belongs.
pub(crate) fn key_paths() -> Vec<String> {
    let root = derived_schema();
    let definitions = root.get("$defs").cloned().unwrap_or_default();
    let mut paths = Vec::new();
    collect_keys(&root, "", &definitions, &mut Vec::new(), &mut paths);
    paths
}

/// Adds the keys of `schema`, found at `path`, to `paths`. `within` holds the definitions
/// being walked, so a recursive one is walked once.
fn collect_keys<'a>(
    schema: &'a Value,
    path: &str,
    definitions: &'a Value,
    within: &mut Vec<&'a str>,
    paths: &mut Vec<String>,
) {
    let Value::Object(object) = schema else {
        return;
    };
    if let Some(Value::String(reference)) = object.get("$ref") {
        let name = reference.trim_start_matches("#/$defs/");
        if let Some(definition) = definitions.get(name)
            && !within.contains(&name)
        {
            within.push(name);
            collect_keys(definition, path, definitions, within, paths);
            within.pop();
        }
    }
    for choices in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(choices)) = object.get(choices) {
            for choice in choices {
                collect_keys(choice, path, definitions, within, paths);
            }
        }
    }
    if let Some(Value::Object(properties)) = object.get("properties") {
        for (key, property) in properties {
            let path = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            if !paths.contains(&path) {
                paths.push(path.clone());
            }
            collect_keys(property, &path, definitions, within, paths);
        }
    }
    if let Some(items) = object.get("items") {
        collect_keys(items, &format!("{path}[]"), definitions, within, paths);
    }
    if let Some(values @ Value::Object(_)) = object.get("additionalProperties") {
        collect_keys(values, &format!("{path}.*"), definitions, within, paths);
    }
}

/// The schema as schemars derives it from the config types, before [`adjust`].
fn derived_schema() -> Value {
    SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<Config>()
        .to_value()
}

/// A socket address as Rust parses it: `IPv4:port` or `[IPv6]:port` (no host names).
pub(crate) fn socket_addr(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "pattern": r"^(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|\[[0-9A-Fa-f:.]+(?:%[0-9]+)?\]):[0-9]{1,5}$",
        "examples": ["127.0.0.1:1883", "0.0.0.0:1883", "[::]:1883"],
    })
}

/// `pipelines[].from`: one topic filter, or a list of at least one.
pub(crate) fn one_or_more_filters(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "anyOf": [
            { "type": "string" },
            { "type": "array", "items": { "type": "string" }, "minItems": 1 },
        ],
        "examples": ["sensors/+/temp", ["sensors/+/temp", "lab/#"]],
    })
}

/// The adjustments in the module docs, on `schema` and every schema inside it (not on
/// `default`, `examples` or `enum` values, which are data).
fn adjust(schema: &mut Value, definitions: &Value) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    if let Some(Value::String(description)) = object.get_mut("description") {
        *description = unwrap_lines(description);
    }
    let plain_text = !["enum", "const", "pattern"]
        .iter()
        .any(|key| object.contains_key(*key));
    if plain_text {
        match object.get_mut("type") {
            Some(ty) if ty == "string" => *ty = serde_json::json!(["string", "number", "boolean"]),
            Some(ty) if *ty == serde_json::json!(["string", "null"]) => {
                *ty = serde_json::json!(["string", "number", "boolean", "null"]);
            }
            _ => {}
        }
    }
    if let Some(Value::Object(properties)) = object.get_mut("properties") {
        for property in properties.values_mut() {
            allow_empty_value(property, definitions);
            describe_from_definition(property, definitions);
        }
    }
    for (key, value) in object.iter_mut() {
        match key.as_str() {
            "properties" | "patternProperties" | "$defs" => {
                for subschema in value
                    .as_object_mut()
                    .into_iter()
                    .flat_map(|m| m.values_mut())
                {
                    adjust(subschema, definitions);
                }
            }
            "anyOf" | "oneOf" | "allOf" | "prefixItems" => {
                for subschema in value.as_array_mut().into_iter().flatten() {
                    adjust(subschema, definitions);
                }
            }
            "items" | "additionalProperties" | "propertyNames" | "not" => {
                adjust(value, definitions);
            }
            _ => {}
        }
    }
}

/// Lets a property holding a mapping or a list be null (written with nothing after the key).
fn allow_empty_value(property: &mut Value, definitions: &Value) {
    let Some(object) = property.as_object_mut() else {
        return;
    };
    let is_container = |ty: &Value| ty == "object" || ty == "array";
    if let Some(ty) = object.get_mut("type") {
        if is_container(ty) {
            *ty = serde_json::json!([ty.clone(), "null"]);
        }
        return;
    }
    let Some(Value::String(reference)) = object.get("$ref") else {
        return;
    };
    let target = reference
        .strip_prefix("#/$defs/")
        .and_then(|name| definitions.get(name));
    if target.and_then(|t| t.get("type")).is_some_and(is_container) {
        let reference = object.remove("$ref").expect("checked above");
        object.insert(
            "anyOf".into(),
            serde_json::json!([{ "$ref": reference }, { "type": "null" }]),
        );
    }
}

/// Gives a property that refers to a definition (directly or as `anyOf`'s first choice) the
/// definition's description when it has none of its own.
fn describe_from_definition(property: &mut Value, definitions: &Value) {
    let Some(object) = property.as_object_mut() else {
        return;
    };
    if object.contains_key("description") {
        return;
    }
    let reference = object
        .get("$ref")
        .or_else(|| object.get("anyOf")?.get(0)?.get("$ref"))
        .and_then(Value::as_str);
    let description = reference
        .and_then(|r| r.strip_prefix("#/$defs/"))
        .and_then(|name| definitions.get(name)?.get("description"))
        .cloned();
    if let Some(description) = description {
        object.insert("description".into(), description);
    }
}

/// Doc comments wrap lines; descriptions are shown reflowed, so single line breaks become
/// spaces (blank lines stay paragraph breaks).
fn unwrap_lines(text: &str) -> String {
    text.split("\n\n")
        .map(|paragraph| paragraph.split('\n').collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// Object keys in sorted order, whichever map type serde_json was built with.
fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(key, value)| (key, sorted(value)))
                    .collect::<Map<_, _>>(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests;
