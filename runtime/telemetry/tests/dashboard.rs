//! configs/grafana-dashboard.json uses only what the gateway exports: every metric in its
//! queries is in `names::ALL` with the right kind, every label is one the code records,
//! counters are only ever rated, and every exported metric is on some panel.
//!
//! The queries are checked with a small PromQL lexer below: enough of the language for
//! dashboards (selectors, range selectors, function calls, aggregations with `by`/`without`,
//! vector matching, arithmetic), not a full parser.

use edgegw_telemetry::names::{self, ALL, Kind, Metric};
use serde_json::Value;
use std::{
    collections::{BTreeSet, HashSet},
    path::PathBuf,
};

fn configs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

fn dashboard() -> Value {
    let path = configs().join("grafana-dashboard.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// Walking the dashboard

/// Every panel, rows included, and the panels nested in (collapsed) rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: Option<&'a Value>, out: &mut Vec<&'a Value>) {
        for panel in list.and_then(Value::as_array).into_iter().flatten() {
            out.push(panel);
            walk(panel.get("panels"), out);
        }
    }
    let mut out = Vec::new();
    walk(dashboard.get("panels"), &mut out);
    out
}

fn is_row(panel: &Value) -> bool {
    panel["type"] == "row"
}

fn title(panel: &Value) -> String {
    panel["title"].as_str().unwrap_or("<untitled>").to_owned()
}

/// A datasource given as the `${datasource}` variable, as an object or (older) a string.
fn uses_datasource_variable(datasource: &Value) -> bool {
    match datasource {
        Value::String(s) => s == "${datasource}" || s == "$datasource",
        Value::Object(o) => {
            o.get("uid").and_then(Value::as_str) == Some("${datasource}")
                && o.get("type").is_none_or(|t| t == "prometheus")
        }
        _ => false,
    }
}

/// The names of the dashboard's template variables.
fn variables(dashboard: &Value) -> HashSet<String> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect()
}

/// `(panel title, refId, expr)` of every query target.
fn queries(dashboard: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            let ref_id = target["refId"].as_str().unwrap_or("?");
            out.push((title(panel), ref_id.to_owned(), expr.to_owned()));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// PromQL

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    /// A Grafana variable outside a string: `$name`, `${name}`, `${name:format}`.
    Var(String),
    Num,
    /// The inside of `[...]`.
    Range(String),
    Open(char),
    Close(char),
    Comma,
    Op(String),
}

fn lex(expr: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    let ident_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && ident_char(chars[i]) {
                i += 1;
            }
            toks.push(Tok::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            toks.push(Tok::Num);
        } else if c == '"' || c == '\'' || c == '`' {
            let mut value = String::new();
            i += 1;
            loop {
                let Some(&d) = chars.get(i) else {
                    return Err(format!("unterminated string in {expr:?}"));
                };
                i += 1;
                if d == c {
                    break;
                }
                if d == '\\' && c != '`' {
                    value.push(*chars.get(i).ok_or("dangling backslash")?);
                    i += 1;
                } else {
                    value.push(d);
                }
            }
            toks.push(Tok::Str(value));
        } else if c == '$' {
            let (name, next) = variable(&chars, i).ok_or(format!("bad variable in {expr:?}"))?;
            toks.push(Tok::Var(name));
            i = next;
        } else if c == '[' {
            let end = (i..chars.len())
                .find(|&j| chars[j] == ']')
                .ok_or(format!("unterminated [ in {expr:?}"))?;
            toks.push(Tok::Range(chars[i + 1..end].iter().collect()));
            i = end + 1;
        } else if c == '(' || c == '{' {
            toks.push(Tok::Open(c));
            i += 1;
        } else if c == ')' || c == '}' {
            toks.push(Tok::Close(c));
            i += 1;
        } else if c == ',' {
            toks.push(Tok::Comma);
            i += 1;
        } else if "=!~<>+-*/^%".contains(c) {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            let op = if ["=~", "!~", "!=", "==", ">=", "<="].contains(&two.as_str()) {
                two
            } else {
                c.to_string()
            };
            if op == "!" || op == "~" {
                return Err(format!("stray {op:?} in {expr:?}"));
            }
            i += op.chars().count();
            toks.push(Tok::Op(op));
        } else {
            return Err(format!("unexpected {c:?} in {expr:?}"));
        }
    }
    Ok(toks)
}

/// A Grafana variable at `chars[at] == '$'`: its name and the index after it.
fn variable(chars: &[char], at: usize) -> Option<(String, usize)> {
    let word = |from: usize| {
        let mut end = from;
        while end < chars.len() && (chars[end].is_ascii_alphanumeric() || chars[end] == '_') {
            end += 1;
        }
        (end > from).then(|| (chars[from..end].iter().collect::<String>(), end))
    };
    if chars.get(at + 1) == Some(&'{') {
        let (name, end) = word(at + 2)?;
        let close = (end..chars.len()).find(|&j| chars[j] == '}')?;
        Some((name, close + 1))
    } else {
        word(at + 1)
    }
}

/// Variables used inside a string (label matcher values).
fn variables_in(s: &str) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    (0..chars.len())
        .filter(|&i| chars[i] == '$')
        .filter_map(|i| variable(&chars, i).map(|(name, _)| name))
        .collect()
}

const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "count_over_time",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "delta",
    "deriv",
    "exp",
    "floor",
    "histogram_avg",
    "histogram_count",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_sum",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "max_over_time",
    "min_over_time",
    "minute",
    "month",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sort",
    "sort_desc",
    "sqrt",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
    "time",
    "timestamp",
    "vector",
    "year",
];

/// Functions of counters (and histogram series, which are counters).
const COUNTER_FUNCTIONS: &[&str] = &["rate", "irate", "increase", "resets"];
/// Functions only meaningful on gauges.
const GAUGE_FUNCTIONS: &[&str] = &["delta", "idelta", "deriv", "predict_linear"];
const KEYWORDS: &[&str] = &["bool", "and", "or", "unless", "offset", "atan2"];
const LABEL_CLAUSES: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
/// Grafana's built-in variables usable in a query.
const GRAFANA_VARIABLES: &[&str] = &[
    "__rate_interval",
    "__interval",
    "__interval_ms",
    "__range",
    "__range_s",
    "__range_ms",
];
/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: &[&str] = &["instance", "job"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// The metric itself (a counter or gauge).
    Plain,
    Bucket,
    Sum,
    Count,
}

/// One series selector in a query: where it is, its metric and which series of it.
#[derive(Clone, Copy, Debug)]
struct Series {
    at: usize,
    metric: &'static Metric,
    part: Part,
}

impl Series {
    fn name(&self) -> String {
        match self.part {
            Part::Plain => self.metric.name.to_owned(),
            Part::Bucket => format!("{}_bucket", self.metric.name),
            Part::Sum => format!("{}_sum", self.metric.name),
            Part::Count => format!("{}_count", self.metric.name),
        }
    }

    fn allows(&self, label: &str) -> bool {
        self.metric.labels.contains(&label)
            || TARGET_LABELS.contains(&label)
            || (self.part == Part::Bucket && label == "le")
    }

    /// A counter, or a series of a histogram (`_bucket`, `_sum`, `_count` are counters).
    fn is_counter_like(&self) -> bool {
        self.metric.kind == Kind::Counter || self.part != Part::Plain
    }
}

/// A series name as the exporter writes it, mapped to its metric in `names::ALL`.
fn resolve(name: &str) -> Result<Series, String> {
    if let Some(metric) = names::metric(name) {
        return match metric.kind {
            Kind::Histogram => Err(format!(
                "{name} is a histogram: query {name}_bucket, _sum or _count"
            )),
            _ => Ok(Series {
                at: 0,
                metric,
                part: Part::Plain,
            }),
        };
    }
    for (suffix, part) in [
        ("_bucket", Part::Bucket),
        ("_sum", Part::Sum),
        ("_count", Part::Count),
    ] {
        if let Some(base) = name.strip_suffix(suffix)
            && let Some(metric) = names::metric(base)
        {
            return match metric.kind {
                Kind::Histogram => Ok(Series {
                    at: 0,
                    metric,
                    part,
                }),
                kind => Err(format!("{name}: {base} is a {kind:?}, it has no {suffix}")),
            };
        }
    }
    Err(format!("{name} is not a metric in names::ALL"))
}

/// Index of the token closing the group opened at `open`.
fn closing(toks: &[Tok], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, tok) in toks.iter().enumerate().skip(open) {
        match tok {
            Tok::Open(_) => depth += 1,
            Tok::Close(_) => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Index of the token opening the group closed at `close`.
fn opening(toks: &[Tok], close: usize) -> Option<usize> {
    let mut depth = 0usize;
    for i in (0..=close).rev() {
        match toks[i] {
            Tok::Close(_) => depth += 1,
            Tok::Open(_) => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Checks one query; returns the series it selects, or every problem found.
fn check_expr(expr: &str, variables: &HashSet<String>) -> Result<Vec<Series>, Vec<String>> {
    let toks = lex(expr).map_err(|e| vec![e])?;
    let mut errors = Vec::new();

    // Brackets pair up, ( with ) and { with }.
    let mut stack = Vec::new();
    for tok in &toks {
        match tok {
            Tok::Open(c) => stack.push(*c),
            Tok::Close(c) => {
                let want = if *c == ')' { '(' } else { '{' };
                if stack.pop() != Some(want) {
                    return Err(vec![format!("unbalanced {c:?} in {expr:?}")]);
                }
            }
            _ => {}
        }
    }
    if !stack.is_empty() {
        return Err(vec![format!("unclosed bracket in {expr:?}")]);
    }

    let mut series: Vec<Series> = Vec::new();
    // (function name, index of its "(", index of its ")")
    let mut calls: Vec<(String, usize, usize)> = Vec::new();
    // (clause keyword, its index, index after its label list, labels)
    let mut clauses: Vec<(String, usize, usize, Vec<String>)> = Vec::new();
    // (series index, label, operator, value)
    let mut matchers: Vec<(usize, String, String, String)> = Vec::new();
    let mut used_variables: Vec<String> = Vec::new();

    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Ident(word) if LABEL_CLAUSES.contains(&word.as_str()) => {
                let optional = word.starts_with("group_");
                if toks.get(i + 1) != Some(&Tok::Open('(')) {
                    if !optional {
                        errors.push(format!("{word} without a label list in {expr:?}"));
                    }
                    i += 1;
                    continue;
                }
                let close = closing(&toks, i + 1).expect("balanced");
                let mut labels = Vec::new();
                for (k, tok) in toks[i + 2..close].iter().enumerate() {
                    match (k % 2, tok) {
                        (0, Tok::Ident(label)) => labels.push(label.clone()),
                        (1, Tok::Comma) => {}
                        _ => errors.push(format!("bad label list after {word} in {expr:?}")),
                    }
                }
                clauses.push((word.clone(), i, close + 1, labels));
                i = close + 1;
            }
            Tok::Ident(word) if toks.get(i + 1) == Some(&Tok::Open('(')) => {
                if !FUNCTIONS.contains(&word.as_str()) && !AGGREGATIONS.contains(&word.as_str()) {
                    errors.push(format!("unknown function {word}() in {expr:?}"));
                }
                calls.push((
                    word.clone(),
                    i + 1,
                    closing(&toks, i + 1).expect("balanced"),
                ));
                i += 1;
            }
            Tok::Ident(word)
                if KEYWORDS.contains(&word.as_str())
                    || (AGGREGATIONS.contains(&word.as_str())
                        && matches!(toks.get(i + 1), Some(Tok::Ident(w)) if w == "by" || w == "without")) =>
            {
                i += 1
            }
            Tok::Ident(word) => {
                let resolved = match resolve(word) {
                    Ok(s) => {
                        series.push(Series { at: i, ..s });
                        true
                    }
                    Err(e) => {
                        errors.push(format!("{e} (in {expr:?})"));
                        false
                    }
                };
                if toks.get(i + 1) != Some(&Tok::Open('{')) {
                    i += 1;
                    continue;
                }
                let close = closing(&toks, i + 1).expect("balanced");
                for (k, chunk) in toks[i + 2..close].split(|t| *t == Tok::Comma).enumerate() {
                    match chunk {
                        [] if k > 0 => {} // trailing comma
                        [Tok::Ident(label), Tok::Op(op), Tok::Str(value)]
                            if ["=", "!=", "=~", "!~"].contains(&op.as_str()) =>
                        {
                            used_variables.extend(variables_in(value));
                            if resolved {
                                let index = series.len() - 1;
                                matchers.push((index, label.clone(), op.clone(), value.clone()));
                            }
                        }
                        _ => errors
                            .push(format!("bad label matcher {chunk:?} on {word} in {expr:?}")),
                    }
                }
                i = close + 1;
            }
            Tok::Open('{') => {
                errors.push(format!("selector without a metric name in {expr:?}"));
                i = closing(&toks, i).expect("balanced") + 1;
            }
            Tok::Var(name) => {
                used_variables.push(name.clone());
                i += 1;
            }
            Tok::Range(inside) => {
                let inside = inside.trim();
                if inside != "$__rate_interval" && inside != "${__rate_interval}" {
                    errors.push(format!(
                        "range [{inside}] in {expr:?}: use [$__rate_interval]"
                    ));
                }
                used_variables.extend(variables_in(inside));
                i += 1;
            }
            _ => i += 1,
        }
    }

    if series.is_empty() {
        errors.push(format!("{expr:?} selects no edgegw metric"));
    }

    for name in &used_variables {
        if !variables.contains(name) && !GRAFANA_VARIABLES.contains(&name.as_str()) {
            errors.push(format!("unknown variable ${name} in {expr:?}"));
        }
    }

    // Label matchers: labels the metric has; values from the closed lists in names.rs.
    for (index, label, op, value) in &matchers {
        let s = &series[*index];
        if !s.allows(label) {
            errors.push(format!(
                "{} has no label {label:?} (it has {:?}) in {expr:?}",
                s.name(),
                s.metric.labels
            ));
        }
        if (op == "=" || op == "!=")
            && let Some(values) = names::label_values(s.metric.name, label)
            && !values.contains(&value.as_str())
        {
            errors.push(format!(
                "{}{{{label}{op}{value:?}}}: {value:?} is not one of {values:?} in {expr:?}",
                s.name()
            ));
        }
    }

    let within =
        |s: &Series, (_, open, close): &(String, usize, usize)| *open < s.at && s.at < *close;

    // rate() and friends over counters only; delta() and friends over gauges only.
    for call in &calls {
        let inside: Vec<&Series> = series.iter().filter(|s| within(s, call)).collect();
        if COUNTER_FUNCTIONS.contains(&call.0.as_str()) {
            for s in &inside {
                if !s.is_counter_like() {
                    errors.push(format!(
                        "{}() over the gauge {} in {expr:?}",
                        call.0,
                        s.name()
                    ));
                }
            }
            if !toks[call.1..call.2]
                .iter()
                .any(|t| matches!(t, Tok::Range(_)))
            {
                errors.push(format!("{}() without a range in {expr:?}", call.0));
            }
        }
        if GAUGE_FUNCTIONS.contains(&call.0.as_str()) {
            for s in inside.iter().filter(|s| s.is_counter_like()) {
                errors.push(format!(
                    "{}() over the counter {} in {expr:?}: use rate() or increase()",
                    call.0,
                    s.name()
                ));
            }
        }
        if call.0 == "histogram_quantile" {
            if inside.is_empty() || inside.iter().any(|s| s.part != Part::Bucket) {
                errors.push(format!(
                    "histogram_quantile() over something other than _bucket series in {expr:?}"
                ));
            }
            for (word, at, _, labels) in &clauses {
                if call.1 < *at && *at < call.2 {
                    let has_le = labels.iter().any(|l| l == "le");
                    if (word == "by" && !has_le) || (word == "without" && has_le) {
                        errors.push(format!(
                            "histogram_quantile() needs `le` kept by its aggregation in {expr:?}"
                        ));
                    }
                }
            }
        }
    }

    // A counter (or histogram series) is only meaningful as a rate or an increase.
    for s in &series {
        if s.is_counter_like()
            && !calls
                .iter()
                .any(|c| COUNTER_FUNCTIONS.contains(&c.0.as_str()) && within(s, c))
        {
            errors.push(format!(
                "counter {} is not inside rate()/increase() in {expr:?}",
                s.name()
            ));
        }
    }

    // Labels in by (...)/without (...) exist on every series aggregated; labels in
    // on (...)/ignoring (...)/group_*(...) exist on every series of the query.
    for (word, at, after, labels) in &clauses {
        let scope: Vec<&Series> = if word == "by" || word == "without" {
            let argument = match (at.checked_sub(1).map(|k| &toks[k]), toks.get(*after)) {
                (Some(Tok::Ident(agg)), Some(Tok::Open('(')))
                    if AGGREGATIONS.contains(&agg.as_str()) =>
                {
                    Some((*after, closing(&toks, *after).expect("balanced")))
                }
                (Some(Tok::Close(')')), _) => {
                    let open = opening(&toks, at - 1).expect("balanced");
                    match open.checked_sub(1).map(|k| &toks[k]) {
                        Some(Tok::Ident(agg)) if AGGREGATIONS.contains(&agg.as_str()) => {
                            Some((open, at - 1))
                        }
                        _ => None,
                    }
                }
                _ => None,
            };
            let Some((open, close)) = argument else {
                errors.push(format!("{word} (...) not on an aggregation in {expr:?}"));
                continue;
            };
            series
                .iter()
                .filter(|s| open < s.at && s.at < close)
                .collect()
        } else {
            series.iter().collect()
        };
        for label in labels {
            for s in &scope {
                if !s.allows(label) {
                    errors.push(format!(
                        "{word} ({label}): {} has no label {label:?} (it has {:?}) in {expr:?}",
                        s.name(),
                        s.metric.labels
                    ));
                }
            }
        }
    }

    if errors.is_empty() {
        Ok(series)
    } else {
        Err(errors)
    }
}

// ---------------------------------------------------------------------------------------
// The dashboard

#[test]
fn dashboard_identity_and_variables() {
    let d = dashboard();
    assert_eq!(d["uid"], "edgegw");
    assert_eq!(d["title"], "edgegw gateway");
    let schema = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(d["id"].is_null(), "an importable dashboard has no id");

    let list = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        list.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    let datasource = var("datasource");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");

    let instance = var("instance");
    assert_eq!(instance["type"], "query");
    assert!(uses_datasource_variable(&instance["datasource"]));
    let query = instance["query"]["query"]
        .as_str()
        .or(instance["query"].as_str())
        .expect("instance query");
    assert_eq!(query, "label_values(edgegw_broker_connections, instance)");
    assert_eq!(instance["definition"], query);
    // label_values(metric, label): an exported metric, and a label its series carry.
    let (metric, label) = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .and_then(|q| q.split_once(','))
        .expect("label_values(metric, label)");
    let series = resolve(metric.trim()).expect("the instance variable's metric");
    assert!(series.allows(label.trim()));
    // A further variable needs its query checked here first.
    for v in list {
        if let Some(name) = v["name"].as_str()
            && !["datasource", "instance"].contains(&name)
        {
            panic!("unexpected variable ${name}: add it to this test");
        }
    }
}

#[test]
fn every_panel_has_a_title_and_the_datasource_variable() {
    let d = dashboard();
    let all = panels(&d);
    assert!(all.len() > 10, "only {} panels", all.len());
    let mut ids = HashSet::new();
    let mut problems = Vec::new();
    for panel in &all {
        let t = title(panel);
        if panel["title"].as_str().is_none_or(|s| s.trim().is_empty()) {
            problems.push(format!("a {} panel has no title", panel["type"]));
        }
        match panel["id"].as_u64() {
            Some(id) if ids.insert(id) => {}
            id => problems.push(format!("{t}: id {id:?} missing or repeated")),
        }
        let pos = &panel["gridPos"];
        let (x, w, h) = (pos["x"].as_u64(), pos["w"].as_u64(), pos["h"].as_u64());
        match (x, w, h, pos["y"].as_u64()) {
            (Some(x), Some(w), Some(h), Some(_)) if w > 0 && h > 0 && x + w <= 24 => {}
            _ => problems.push(format!("{t}: gridPos {pos} outside the 24-column grid")),
        }
        if is_row(panel) {
            continue;
        }
        if !uses_datasource_variable(&panel["datasource"]) {
            problems.push(format!(
                "{t}: datasource {} is not ${{datasource}}",
                panel["datasource"]
            ));
        }
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("{t}: no queries"));
        }
        let mut ref_ids = HashSet::new();
        for target in &targets {
            if let Some(ds) = target.get("datasource")
                && !uses_datasource_variable(ds)
            {
                problems.push(format!(
                    "{t}: a query's datasource {ds} is not ${{datasource}}"
                ));
            }
            if !target["refId"]
                .as_str()
                .is_some_and(|r| ref_ids.insert(r.to_owned()))
            {
                problems.push(format!("{t}: refId missing or repeated"));
            }
            if target["expr"].as_str().is_none_or(|e| e.trim().is_empty()) {
                problems.push(format!("{t}: a query without expr"));
            }
        }
        let unit = panel["fieldConfig"]["defaults"]["unit"].as_str();
        if !unit.is_some_and(|u| ["short", "none", "ops", "Bps", "bytes", "s"].contains(&u)) {
            problems.push(format!("{t}: unit {unit:?}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn top_level_panels_do_not_overlap() {
    let d = dashboard();
    let rects: Vec<(String, [u64; 4])> = d["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .map(|p| {
            let g = &p["gridPos"];
            let n = |k: &str| g[k].as_u64().unwrap_or(0);
            (title(p), [n("x"), n("y"), n("w"), n("h")])
        })
        .collect();
    for (i, (a, [ax, ay, aw, ah])) in rects.iter().enumerate() {
        for (b, [bx, by, bw, bh]) in &rects[i + 1..] {
            let apart = ax + aw <= *bx || bx + bw <= *ax || ay + ah <= *by || by + bh <= *ay;
            assert!(apart, "panels {a:?} and {b:?} overlap");
        }
    }
}

#[test]
fn every_query_uses_exported_metrics_with_their_kinds_and_labels() {
    let d = dashboard();
    let vars = variables(&d);
    let mut problems = Vec::new();
    let all = queries(&d);
    assert!(all.len() > 20, "only {} queries", all.len());
    for (panel, ref_id, expr) in &all {
        if let Err(errors) = check_expr(expr, &vars) {
            for e in errors {
                problems.push(format!("{panel} / {ref_id}: {e}"));
            }
        }
        if !expr.contains("instance=~\"$instance\"") {
            problems.push(format!("{panel} / {ref_id}: not filtered by $instance"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn dashboard_covers_every_metric() {
    let d = dashboard();
    let vars = variables(&d);
    let mut shown = BTreeSet::new();
    for (panel, _, expr) in queries(&d) {
        let series = check_expr(&expr, &vars).unwrap_or_else(|e| panic!("{panel}: {e:?}"));
        shown.extend(series.iter().map(|s| s.metric.name));
    }
    let missing: Vec<&str> = ALL
        .iter()
        .map(|m| m.name)
        .filter(|n| !shown.contains(n))
        .collect();
    assert!(missing.is_empty(), "metrics on no panel: {missing:?}");
}

#[test]
fn histograms_are_shown_as_quantiles() {
    let d = dashboard();
    for m in ALL.iter().filter(|m| m.kind == Kind::Histogram) {
        let quantiles: Vec<String> = queries(&d)
            .into_iter()
            .map(|(_, _, expr)| expr)
            .filter(|e| e.contains("histogram_quantile(") && e.contains(m.name))
            .collect();
        for q in ["0.5", "0.99"] {
            assert!(
                quantiles
                    .iter()
                    .any(|e| e.starts_with(&format!("histogram_quantile({q},"))),
                "{}: no p{} panel",
                m.name,
                q.trim_start_matches("0.")
            );
        }
    }
}

/// The gateway's own recorder, given one series of every metric in `names::ALL` with the
/// labels declared there, exports every series the dashboard queries, with the TYPE the
/// dashboard assumes (histograms as `_bucket`/`_sum`/`_count`, names unchanged).
#[test]
fn dashboard_series_are_in_the_gateways_exposition() {
    let telemetry = edgegw_telemetry::Telemetry::install().expect("recorder");
    for m in ALL {
        let labels: Vec<metrics::Label> = m
            .labels
            .iter()
            .map(|&label| {
                let value = names::label_values(m.name, label).map_or("x", |v| v[0]);
                metrics::Label::new(label, value)
            })
            .collect();
        match m.kind {
            Kind::Counter => metrics::counter!(m.name, labels).increment(1),
            Kind::Gauge => metrics::gauge!(m.name, labels).set(1.0),
            Kind::Histogram => metrics::histogram!(m.name, labels).record(0.003),
        }
    }
    let text = telemetry.render();

    let mut exported = HashSet::new();
    let mut types = HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            types.insert(rest.to_owned());
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            exported.insert(name.to_owned());
        }
    }
    for m in ALL {
        let kind = match m.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        assert!(
            types.contains(&format!("{} {kind}", m.name)),
            "no `# TYPE {} {kind}` in\n{text}",
            m.name
        );
    }
    for m in ALL.iter().filter(|m| m.kind == Kind::Histogram) {
        let bucket = format!("{}_bucket{{", m.name);
        assert!(
            text.lines()
                .any(|l| l.starts_with(&bucket) && l.contains("le=\"+Inf\"")),
            "{} is not exported with buckets:\n{text}",
            m.name
        );
    }

    let d = dashboard();
    let vars = variables(&d);
    for (panel, _, expr) in queries(&d) {
        for s in check_expr(&expr, &vars).unwrap_or_else(|e| panic!("{panel}: {e:?}")) {
            assert!(
                exported.contains(&s.name()),
                "{panel}: {} is not in the exposition",
                s.name()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// The checker itself: each mistake it exists to catch is caught.

fn vars() -> HashSet<String> {
    ["datasource", "instance"].map(str::to_owned).into()
}

fn rejects(expr: &str, needle: &str) {
    match check_expr(expr, &vars()) {
        Ok(_) => panic!("accepted {expr:?}"),
        Err(errors) => assert!(
            errors.iter().any(|e| e.contains(needle)),
            "{expr:?}: expected an error with {needle:?}, got {errors:?}"
        ),
    }
}

#[test]
fn checker_accepts_good_queries() {
    for expr in [
        r#"sum by (protocol) (edgegw_broker_connections{instance=~"$instance"})"#,
        r#"sum(rate(edgegw_broker_dropped_messages_total{instance=~"$instance", reason="queue_full"}[$__rate_interval])) by (reason)"#,
        r#"histogram_quantile(0.99, sum by (le, uplink) (rate(edgegw_uplink_ack_round_trip_seconds_bucket{instance=~"$instance"}[$__rate_interval])))"#,
        r#"sum(rate(edgegw_rules_call_duration_seconds_sum[$__rate_interval])) / sum(rate(edgegw_rules_call_duration_seconds_count[$__rate_interval]))"#,
        r#"max by (uplink) (edgegw_uplink_outbox_oldest_age_seconds) > 60"#,
        r#"sum by (pipeline, plugin, result) (increase(edgegw_rules_invocations_total{result!="ok"}[${__rate_interval}]))"#,
    ] {
        if let Err(e) = check_expr(expr, &vars()) {
            panic!("{expr}: {e:?}");
        }
    }
}

#[test]
fn checker_rejects_unknown_metrics() {
    rejects(
        "edgegw_broker_connection",
        "edgegw_broker_connection is not a metric",
    );
    rejects("egdegw_broker_connections", "not a metric");
    rejects(
        "rate(edgegw_broker_messages_recieved_total[$__rate_interval])",
        "not a metric",
    );
    rejects("sum(up)", "not a metric");
    rejects(
        r#"{__name__="edgegw_broker_sessions"}"#,
        "without a metric name",
    );
    rejects("summ(edgegw_broker_sessions)", "unknown function summ()");
}

#[test]
fn checker_rejects_wrong_kinds() {
    rejects(
        "rate(edgegw_broker_connections[$__rate_interval])",
        "rate() over the gauge",
    );
    rejects(
        "increase(edgegw_uplink_outbox_bytes[$__rate_interval])",
        "increase() over the gauge",
    );
    rejects("edgegw_broker_messages_sent_total", "not inside rate()");
    rejects(
        "deriv(edgegw_store_commits_total[$__rate_interval])",
        "deriv() over the counter",
    );
    rejects(
        "rate(edgegw_broker_sessions_bucket[$__rate_interval])",
        "is a Gauge, it has no _bucket",
    );
    rejects(
        "rate(edgegw_store_ops_total_count[$__rate_interval])",
        "is a Counter, it has no _count",
    );
    rejects(
        "rate(edgegw_uplink_ack_round_trip_seconds[$__rate_interval])",
        "is a histogram",
    );
    rejects(
        "histogram_quantile(0.99, sum by (plugin) (rate(edgegw_rules_call_duration_seconds_bucket[$__rate_interval])))",
        "needs `le`",
    );
    rejects(
        "histogram_quantile(0.99, rate(edgegw_rules_call_duration_seconds_sum[$__rate_interval]))",
        "other than _bucket",
    );
    rejects("rate(edgegw_store_ops_total)", "without a range");
}

#[test]
fn checker_rejects_wrong_labels() {
    rejects(
        "sum by (version) (edgegw_broker_connections)",
        r#"has no label "version""#,
    );
    rejects(
        r#"edgegw_broker_connections{protocl="5"}"#,
        r#"has no label "protocl""#,
    );
    rejects(
        "sum(rate(edgegw_pipeline_messages_total[$__rate_interval])) by (plugin)",
        r#"has no label "plugin""#,
    );
    rejects(
        "sum by (le) (rate(edgegw_rules_call_duration_seconds_sum[$__rate_interval]))",
        r#"has no label "le""#,
    );
    rejects(
        r#"rate(edgegw_pipeline_dropped_total{reason="queue_full"}[$__rate_interval])"#,
        "is not one of",
    );
    rejects(
        r#"rate(edgegw_rules_invocations_total{result!="failed"}[$__rate_interval])"#,
        "is not one of",
    );
    rejects(
        "rate(edgegw_store_ops_total[$__rate_interval]) / on (uplink) rate(edgegw_store_commits_total[$__rate_interval])",
        "on (uplink)",
    );
    rejects("rate(edgegw_store_ops_total[5m])", "use [$__rate_interval]");
    rejects(
        r#"edgegw_broker_sessions{instance=~"$instanse"}"#,
        "unknown variable $instanse",
    );
}

#[test]
fn walker_finds_panels_nested_in_collapsed_rows() {
    let d: Value = serde_json::json!({
        "panels": [
            { "type": "row", "title": "open", "panels": [] },
            { "type": "timeseries", "title": "a", "targets": [{ "refId": "A", "expr": "x" }] },
            { "type": "row", "title": "closed", "collapsed": true, "panels": [
                { "type": "stat", "title": "b", "targets": [{ "refId": "A", "expr": "y" }] }
            ] }
        ]
    });
    let titles: Vec<String> = panels(&d).into_iter().map(title).collect();
    assert_eq!(titles, ["open", "a", "closed", "b"]);
    let exprs: Vec<String> = queries(&d).into_iter().map(|(_, _, e)| e).collect();
    assert_eq!(exprs, ["x", "y"]);
}
