//! The Azure Monitor workbook the AKS profile deploys
//! (`bicep/workbooks/trellis-mesh.workbook.json`), checked without Azure:
//!
//! - it is a workbook (`Notebook/1.0`): every item has a type of the workbook schema and a
//!   name of its own, query items name a data source this workbook may use (logs against
//!   Application Insights, Azure Resource Graph for the pickers, Prometheus against an Azure
//!   Monitor workspace) and bind to a resource picker of the matching resource type;
//! - every `{Parameter}` an item uses is defined by a parameter item above it;
//! - every PromQL query parses (with `promql-parser`), names only metrics documented in
//!   `docs/metrics.md` (as their samples are named: histograms as `_bucket`/`_sum`/`_count`,
//!   counters with `_total`), and uses in its selectors, `by`/`without`, `on`/`ignoring`,
//!   `group_left`/`group_right` and `label_replace`/`label_join` only labels documented for
//!   those metrics (`le` on `_bucket` series), for every value its parameters can take;
//! - it shows what it is for: golden signals by service and by workload, failing edges,
//!   certificate expiry, the trace view, the signals per route.
//!
//! Pure: the files are compiled in, nothing is started or fetched.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, anyhow, bail, ensure};
use promql_parser::label::{self, MatchOp};
use promql_parser::parser::token::{
    T_BOTTOMK, T_COUNT_VALUES, T_LIMIT_RATIO, T_LIMITK, T_LOR, T_TOPK,
};
use promql_parser::parser::value::ValueType;
use promql_parser::parser::{
    self, AggregateExpr, BinaryExpr, Call, Expr, LabelModifier, VectorMatchCardinality,
    VectorSelector,
};
use serde_json::Value;

/// The workbook under test, as compiled in (a change to it rebuilds this test).
const WORKBOOK: &str = include_str!("../../../bicep/workbooks/trellis-mesh.workbook.json");

/// The metric reference the queries are held to.
const METRICS_DOC: &str = include_str!("../../../docs/metrics.md");

/// Item types of the workbook schema (microsoft/Application-Insights-Workbooks,
/// `schema/workbook.json`): markdown, query, parameters, metric, links, group.
const ITEM_TYPES: &[u64] = &[1, 3, 9, 10, 11, 12];

/// Parameter types this workbook uses: text, drop down, time range, resource picker,
/// subscription picker.
const PARAMETER_TYPES: &[u64] = &[1, 2, 4, 5, 6];

/// Parameter type of a time range picker.
const TIME_RANGE: u64 = 4;
/// Parameter type of a resource picker.
const RESOURCE_PICKER: u64 = 5;
/// Parameter type of a subscription picker.
const SUBSCRIPTION_PICKER: u64 = 6;

/// `queryType` of a logs (KQL) query.
const QUERY_LOGS: u64 = 0;
/// `queryType` of an Azure Resource Graph query.
const QUERY_RESOURCE_GRAPH: u64 = 1;
/// `queryType` of a Prometheus (PromQL) query against an Azure Monitor workspace.
const QUERY_PROMETHEUS: u64 = 16;

/// The `resourceType` each data source queries.
const DATA_SOURCES: &[(u64, &str)] = &[
    (QUERY_LOGS, "microsoft.insights/components"),
    (QUERY_RESOURCE_GRAPH, "microsoft.resourcegraph/resources"),
    (QUERY_PROMETHEUS, "microsoft.monitor/accounts"),
];

/// Value the coverage test gives the namespace filter, to find where it lands.
const NAMESPACE_SENTINEL: &str = "NAMESPACE_FILTER";

// ---------------------------------------------------------------------------------------
// docs/metrics.md

/// Series name, as a PromQL query names it -> the labels its samples carry.
type Series = BTreeMap<String, BTreeSet<String>>;

/// Every series the metric tables of `doc` document: the rows whose first cell is a
/// backticked `trellis_*` or `http_*` name (columns: metric, type, labels, ...). Counters
/// are named with `_total` (added when a row leaves it out), histograms as `_bucket` (with
/// `le`), `_sum` and `_count`.
fn documented_series(doc: &str) -> anyhow::Result<Series> {
    let mut series = Series::new();
    let mut families = BTreeSet::new();
    for (i, line) in doc.lines().enumerate() {
        let at = i + 1;
        let Some(inner) = line.strip_prefix('|') else {
            continue;
        };
        let cells: Vec<&str> = inner.split('|').map(str::trim).collect();
        let Some(name) = cells
            .first()
            .and_then(|c| backticked(c))
            .filter(|n| n.starts_with("trellis_") || n.starts_with("http_"))
        else {
            continue;
        };
        ensure!(
            cells.len() >= 3,
            "line {at}: {name}: no type and labels cells"
        );
        ensure!(
            families.insert(name.to_owned()),
            "line {at}: {name} documented twice"
        );
        let labels = labels_cell(cells[2]).with_context(|| format!("line {at}: {name}"))?;
        match cells[1] {
            "counter" => {
                let exposed = if name.ends_with("_total") {
                    name.to_owned()
                } else {
                    format!("{name}_total")
                };
                series.insert(exposed, labels);
            }
            "gauge" => {
                series.insert(name.to_owned(), labels);
            }
            "histogram" => {
                let mut bucket = labels.clone();
                bucket.insert("le".to_owned());
                series.insert(format!("{name}_bucket"), bucket);
                series.insert(format!("{name}_sum"), labels.clone());
                series.insert(format!("{name}_count"), labels);
            }
            other => bail!("line {at}: {name} has type {other:?}"),
        }
    }
    Ok(series)
}

/// `none`, or `` `label`: values `` entries separated by `;`: the label names.
fn labels_cell(cell: &str) -> anyhow::Result<BTreeSet<String>> {
    if cell == "none" {
        return Ok(BTreeSet::new());
    }
    cell.split(';')
        .map(|entry| {
            let (name, _) = entry
                .trim()
                .split_once(':')
                .with_context(|| format!("{entry:?} is not `label`: values"))?;
            backticked(name.trim())
                .map(str::to_owned)
                .with_context(|| format!("no backticked label name in {entry:?}"))
        })
        .collect()
}

fn backticked(s: &str) -> Option<&str> {
    s.strip_prefix('`')?
        .strip_suffix('`')
        .filter(|v| !v.is_empty() && !v.contains('`'))
}

// ---------------------------------------------------------------------------------------
// The workbook

fn workbook() -> Value {
    serde_json::from_str(WORKBOOK).expect("the workbook is not JSON")
}

fn series() -> Series {
    documented_series(METRICS_DOC).expect("docs/metrics.md does not parse")
}

/// Every item, depth first in document order (a group's items follow the group).
fn all_items(wb: &Value) -> Vec<&Value> {
    fn walk<'a>(items: &'a [Value], out: &mut Vec<&'a Value>) {
        for item in items {
            out.push(item);
            if let Some(children) = item.pointer("/content/items").and_then(Value::as_array) {
                walk(children, out);
            }
        }
    }
    let mut out = Vec::new();
    if let Some(items) = wb.get("items").and_then(Value::as_array) {
        walk(items, &mut out);
    }
    out
}

/// An item's name, for messages.
fn item_name(item: &Value) -> &str {
    item.get("name")
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
}

/// The parameters defined by the parameter items, in document order.
fn parameters(wb: &Value) -> Vec<&Value> {
    all_items(wb)
        .into_iter()
        .filter(|i| i.get("type").and_then(Value::as_u64) == Some(9))
        .flat_map(|i| {
            i.pointer("/content/parameters")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .collect()
}

/// The `{Name}` and `{Name:format}` parameter references in `s`, by name.
fn param_refs(s: &str) -> Vec<&str> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut refs = Vec::new();
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        rest = &rest[open + 1..];
        let len = rest.find(|c| !is_ident(c)).unwrap_or(rest.len());
        let name = &rest[..len];
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            continue;
        }
        let after = &rest[len..];
        let closes = after.starts_with('}')
            || after.strip_prefix(':').is_some_and(|format| {
                let n = format.find(|c| !is_ident(c)).unwrap_or(format.len());
                n > 0 && format[n..].starts_with('}')
            });
        if closes {
            refs.push(name);
        }
    }
    refs
}

/// `s` with every parameter reference replaced by its value in `values`.
fn substitute(s: &str, values: &BTreeMap<String, String>) -> anyhow::Result<String> {
    let mut out = s.to_owned();
    for name in param_refs(s) {
        let value = values
            .get(name)
            .with_context(|| format!("parameter {{{name}}} has no value to check with"))?;
        out = out.replace(&format!("{{{name}}}"), value);
        let with_format = format!("{{{name}:");
        while let Some(start) = out.find(&with_format) {
            let end = start
                + out[start..]
                    .find('}')
                    .context("unterminated parameter reference")?;
            out.replace_range(start..=end, value);
        }
    }
    Ok(out)
}

/// Every string in `v`, except under the keys in `skip` (nested items, or a parameter
/// item's parameters, which are checked one by one).
fn strings<'a>(v: &'a Value, skip: &[&str], out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|x| strings(x, skip, out)),
        Value::Object(o) => {
            for (k, x) in o {
                if !skip.contains(&k.as_str()) {
                    strings(x, skip, out);
                }
            }
        }
        _ => {}
    }
}

/// What is wrong with `wb` as a workbook: version, item types and names, the content each
/// item type needs, data sources, parameter definitions.
fn notebook_problems(wb: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if wb.get("version").and_then(Value::as_str) != Some("Notebook/1.0") {
        problems.push(format!(
            "version is {:?}, not \"Notebook/1.0\"",
            wb.get("version")
        ));
    }
    if wb
        .get("items")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
    {
        problems.push("no items".to_owned());
    }
    let mut names = BTreeSet::new();
    let mut param_names = BTreeSet::new();
    let mut param_ids = BTreeSet::new();
    for item in all_items(wb) {
        let name = item_name(item);
        match item.get("name").and_then(Value::as_str) {
            None | Some("") => problems.push(format!("an item has no name: {item}")),
            Some(n) => {
                if !names.insert(n) {
                    problems.push(format!("item name {n:?} is used twice"));
                }
            }
        }
        let kind = item.get("type").and_then(Value::as_u64);
        let Some(kind) = kind.filter(|k| ITEM_TYPES.contains(k)) else {
            problems.push(format!(
                "{name}: type {kind:?} is not an item type of the schema"
            ));
            continue;
        };
        let Some(content) = item.get("content").filter(|c| c.is_object()) else {
            problems.push(format!("{name}: no content object"));
            continue;
        };
        let version = content.get("version").and_then(Value::as_str);
        let want_version = match kind {
            3 => Some("KqlItem/1.0"),
            9 => Some("KqlParameterItem/1.0"),
            11 => Some("LinkItem/1.0"),
            12 => Some("NotebookGroup/1.0"),
            _ => None,
        };
        if want_version.is_some() && version != want_version {
            problems.push(format!(
                "{name}: content version {version:?}, want {want_version:?}"
            ));
        }
        match kind {
            1 if content.get("json").and_then(Value::as_str).is_none() => {
                problems.push(format!("{name}: markdown item without json text"));
            }
            3 => problems.extend(
                query_problems(content)
                    .into_iter()
                    .map(|p| format!("{name}: {p}")),
            ),
            9 => {
                let params = content.get("parameters").and_then(Value::as_array);
                for param in params.into_iter().flatten() {
                    let pname = param.get("name").and_then(Value::as_str).unwrap_or("");
                    let valid_name = pname.starts_with(|c: char| c.is_ascii_alphabetic())
                        && pname.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !valid_name {
                        problems.push(format!("{name}: parameter name {pname:?} is not a name"));
                    }
                    if !param_names.insert(pname) {
                        problems.push(format!("{name}: parameter {pname} is defined twice"));
                    }
                    match param.get("id").and_then(Value::as_str) {
                        Some(id) if param_ids.insert(id) => {}
                        id => {
                            problems.push(format!("{name}: {pname}: id {id:?} missing or reused"))
                        }
                    }
                    problems.extend(
                        parameter_problems(param)
                            .into_iter()
                            .map(|p| format!("{name}: parameter {pname}: {p}")),
                    );
                }
            }
            12 if content.get("items").and_then(Value::as_array).is_none() => {
                problems.push(format!("{name}: group without items"));
            }
            _ => {}
        }
    }
    problems
}

/// What is wrong with the content of a query item (or a parameter that runs a query).
fn query_problems(content: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let query_type = content.get("queryType").and_then(Value::as_u64);
    let resource_type = content.get("resourceType").and_then(Value::as_str);
    match DATA_SOURCES.iter().find(|(t, _)| Some(*t) == query_type) {
        None => problems.push(format!(
            "queryType {query_type:?} is none of logs ({QUERY_LOGS}), resource graph \
             ({QUERY_RESOURCE_GRAPH}), Prometheus ({QUERY_PROMETHEUS})"
        )),
        Some((_, want)) if resource_type != Some(*want) => problems.push(format!(
            "queryType {query_type:?} queries {want}, resourceType is {resource_type:?}"
        )),
        Some(_) => {}
    }
    let Some(query) = content.get("query").and_then(Value::as_str) else {
        problems.push("no query".to_owned());
        return problems;
    };
    if query_type == Some(QUERY_PROMETHEUS) {
        if let Err(e) = prometheus_query(query) {
            problems.push(format!("{e:#}"));
        }
    } else if query.trim().is_empty() {
        problems.push("empty query".to_owned());
    }
    let bound = content
        .get("crossComponentResources")
        .and_then(Value::as_array)
        .is_some_and(|r| !r.is_empty() && r.iter().all(Value::is_string));
    if !bound {
        problems.push("crossComponentResources does not name the resources to query".to_owned());
    }
    problems
}

/// The PromQL text of a Prometheus query: the JSON the workbook keeps in `query`.
fn prometheus_query(query: &str) -> anyhow::Result<String> {
    let provider: Value =
        serde_json::from_str(query).context("a Prometheus query is not provider JSON")?;
    let version = provider.get("version").and_then(Value::as_str);
    ensure!(
        version == Some("PrometheusQueryProvider/1.0"),
        "provider version {version:?}, want PrometheusQueryProvider/1.0"
    );
    let kind = provider.get("type").and_then(Value::as_str);
    ensure!(
        matches!(kind, Some("query" | "query_range")),
        "Prometheus query type {kind:?}, want query (instant) or query_range"
    );
    let text = provider
        .get("queryText")
        .and_then(Value::as_str)
        .context("no queryText")?;
    ensure!(!text.trim().is_empty(), "empty queryText");
    Ok(text.to_owned())
}

/// What is wrong with one parameter's definition.
fn parameter_problems(param: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let kind = param.get("type").and_then(Value::as_u64);
    if !kind.is_some_and(|k| PARAMETER_TYPES.contains(&k)) {
        problems.push(format!("type {kind:?} is not one this workbook knows"));
    }
    if param.get("version").and_then(Value::as_str) != Some("KqlParameterItem/1.0") {
        problems.push("version is not KqlParameterItem/1.0".to_owned());
    }
    if param.get("query").is_some() {
        problems.extend(query_problems(param));
    }
    if let Some(json) = param.get("jsonData") {
        match options(json) {
            Err(e) => problems.push(format!("jsonData: {e:#}")),
            Ok(options) => {
                let value = param.get("value").and_then(Value::as_str);
                if value.is_some_and(|v| !options.iter().any(|o| o == v)) {
                    problems.push(format!("default {value:?} is not one of {options:?}"));
                }
            }
        }
    }
    if kind == Some(TIME_RANGE)
        && param
            .pointer("/value/durationMs")
            .and_then(Value::as_u64)
            .is_none()
    {
        problems.push("a time range without a default duration".to_owned());
    }
    problems
}

/// The values a drop down's `jsonData` offers.
fn options(json: &Value) -> anyhow::Result<Vec<String>> {
    let text = json.as_str().context("not a string")?;
    let list: Vec<Value> = serde_json::from_str(text).context("not a JSON array")?;
    list.iter()
        .map(|o| {
            o.get("value")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .with_context(|| format!("{o} has no string value"))
        })
        .collect()
}

/// References to parameters that are not defined by a parameter item above the use, and
/// bindings that do not fit: a time context that is not a time range, resources that are
/// not a picker of the resource type the query needs.
fn reference_problems(wb: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let mut defined: BTreeMap<&str, &Value> = BTreeMap::new();
    for item in all_items(wb) {
        let name = item_name(item);
        let is_parameters = item.get("type").and_then(Value::as_u64) == Some(9);
        let mut used = Vec::new();
        strings(item, &["items", "parameters"], &mut used);
        check_refs(name, &used, &defined, &mut problems);
        check_bindings(name, item.get("content"), &defined, &mut problems);
        if let Some(vis) = item.get("conditionalVisibility").filter(|v| !v.is_null()) {
            let pname = vis.get("parameterName").and_then(Value::as_str);
            if !pname.is_some_and(|p| defined.contains_key(p)) {
                problems.push(format!("{name}: visibility depends on undefined {pname:?}"));
            }
        }
        if is_parameters {
            let params = item
                .pointer("/content/parameters")
                .and_then(Value::as_array);
            for param in params.into_iter().flatten() {
                let pname = param.get("name").and_then(Value::as_str).unwrap_or("");
                let mut used = Vec::new();
                strings(param, &[], &mut used);
                check_refs(&format!("{name}/{pname}"), &used, &defined, &mut problems);
                check_bindings(
                    &format!("{name}/{pname}"),
                    Some(param),
                    &defined,
                    &mut problems,
                );
                defined.insert(pname, param);
            }
        }
    }
    problems
}

fn check_refs(
    at: &str,
    used: &[&str],
    defined: &BTreeMap<&str, &Value>,
    problems: &mut Vec<String>,
) {
    for s in used {
        for r in param_refs(s) {
            if !defined.contains_key(r) {
                problems.push(format!("{at}: {{{r}}} is not defined by a parameter above"));
            }
        }
    }
}

/// `timeContextFromParameter` names a time range; every `crossComponentResources` entry is
/// a picker that offers the resource type the query runs against (or subscriptions, for a
/// resource graph query).
fn check_bindings(
    at: &str,
    content: Option<&Value>,
    defined: &BTreeMap<&str, &Value>,
    problems: &mut Vec<String>,
) {
    let Some(content) = content else {
        return;
    };
    let kind_of = |p: &str| {
        defined
            .get(p)
            .and_then(|d| d.get("type"))
            .and_then(Value::as_u64)
    };
    if let Some(tp) = content
        .get("timeContextFromParameter")
        .and_then(Value::as_str)
        && kind_of(tp) != Some(TIME_RANGE)
    {
        problems.push(format!(
            "{at}: time context {tp} is not a time range parameter"
        ));
    }
    let Some(query_type) = content.get("queryType").and_then(Value::as_u64) else {
        return;
    };
    if content.get("query").is_none() {
        return;
    }
    let resource_type = content
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("");
    let resources = content
        .get("crossComponentResources")
        .and_then(Value::as_array);
    for resource in resources.into_iter().flatten().filter_map(Value::as_str) {
        let refs = param_refs(resource);
        let &[picker] = refs.as_slice() else {
            problems.push(format!(
                "{at}: resource {resource:?} is not one picker parameter (a fixed id would tie \
                 the workbook to one deployment)"
            ));
            continue;
        };
        let fits = match kind_of(picker) {
            Some(SUBSCRIPTION_PICKER) => query_type == QUERY_RESOURCE_GRAPH,
            Some(RESOURCE_PICKER) => {
                defined[picker]
                    .pointer("/typeSettings/resourceTypeFilter")
                    .and_then(|f| f.get(resource_type))
                    .and_then(Value::as_bool)
                    == Some(true)
            }
            _ => false,
        };
        if !fits {
            problems.push(format!(
                "{at}: queries {resource_type} in {{{picker}}}, which does not pick that type"
            ));
        }
    }
}

/// Parameter name -> the values to check PromQL with: its default first, then the other
/// options of a drop down.
fn parameter_values(wb: &Value) -> BTreeMap<String, Vec<String>> {
    let mut values = BTreeMap::new();
    for param in parameters(wb) {
        let Some(name) = param.get("name").and_then(Value::as_str) else {
            continue;
        };
        let mut list: Vec<String> = param
            .get("value")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .into_iter()
            .collect();
        if let Some(Ok(opts)) = param.get("jsonData").map(options) {
            for option in opts {
                if !list.contains(&option) {
                    list.push(option);
                }
            }
        }
        values.insert(name.to_owned(), list);
    }
    values
}

/// Every PromQL query of the workbook, with the name of its item.
fn promql_queries(wb: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let items = all_items(wb);
    let queries = items.iter().copied().chain(parameters(wb));
    for q in queries {
        let is_parameter = q.get("version").and_then(Value::as_str) == Some("KqlParameterItem/1.0");
        let content = if is_parameter {
            Some(q)
        } else {
            q.get("content")
        };
        let Some(content) = content else {
            continue;
        };
        if content.get("queryType").and_then(Value::as_u64) != Some(QUERY_PROMETHEUS) {
            continue;
        }
        let Some(text) = content
            .get("query")
            .and_then(Value::as_str)
            .and_then(|q| prometheus_query(q).ok())
        else {
            continue;
        };
        out.push((item_name(q).to_owned(), text));
    }
    out
}

/// Problems of every PromQL query in `wb`, each checked with every value its parameters
/// can take (the defaults, then each option of a drop down in turn).
fn promql_problems(wb: &Value, series: &Series) -> BTreeSet<String> {
    let all_values = parameter_values(wb);
    let mut problems = BTreeSet::new();
    for (name, text) in promql_queries(wb) {
        let used: BTreeSet<&str> = param_refs(&text).into_iter().collect();
        let mut defaults = BTreeMap::new();
        for p in &used {
            match all_values.get(*p).and_then(|v| v.first()) {
                Some(v) => {
                    defaults.insert((*p).to_owned(), v.clone());
                }
                None => {
                    problems.insert(format!(
                        "{name}: {{{p}}} has no default value to check the query with"
                    ));
                }
            }
        }
        let mut variants = vec![defaults.clone()];
        for p in &used {
            for option in all_values.get(*p).into_iter().flatten().skip(1) {
                let mut v = defaults.clone();
                v.insert((*p).to_owned(), option.clone());
                variants.push(v);
            }
        }
        for values in &variants {
            let checked = substitute(&text, values).and_then(|q| analyze(&q, series));
            match checked {
                Err(e) => {
                    problems.insert(format!("{name}: {e:#} (with {values:?})"));
                }
                Ok(a) => problems.extend(a.problems.into_iter().map(|p| format!("{name}: {p}"))),
            }
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------
// PromQL: parsed by promql-parser, its syntax tree walked here for metrics and labels

/// One vector selector: metric name and matchers (label, operator, value).
#[derive(Debug)]
struct Selector {
    metric: String,
    matchers: Vec<(String, String, String)>,
}

/// What a query uses, and what is wrong with it beyond syntax.
#[derive(Debug, Default)]
struct Analysis {
    selectors: Vec<Selector>,
    /// The label lists of `by (...)` clauses.
    groupings: Vec<BTreeSet<String>>,
    problems: Vec<String>,
}

/// Parses `query` (a syntax error, from promql-parser, is an `Err`) and checks every metric
/// and label it uses against `series`.
fn analyze(query: &str, series: &Series) -> anyhow::Result<Analysis> {
    let expr = parser::parse(query).map_err(|e| anyhow!("PromQL does not parse: {e}"))?;
    let mut walk = Walk {
        series,
        out: Analysis::default(),
    };
    walk.expr(&expr);
    Ok(walk.out)
}

/// The labels an expression's samples can carry.
#[derive(Debug, Clone)]
enum Labels {
    /// A number or a string: no labels.
    Scalar,
    /// Built on an undocumented metric (already reported): anything goes, to report the
    /// cause once rather than every label after it.
    Unknown,
    Known(BTreeSet<String>),
}

impl Labels {
    fn has(&self, label: &str) -> bool {
        match self {
            Self::Scalar => false,
            Self::Unknown => true,
            Self::Known(s) => s.contains(label),
        }
    }

    fn without(self, labels: &BTreeSet<String>) -> Self {
        match self {
            Self::Known(s) => Self::Known(s.difference(labels).cloned().collect()),
            other => other,
        }
    }

    fn with(self, labels: impl IntoIterator<Item = String>) -> Self {
        match self {
            Self::Known(mut s) => {
                s.extend(labels);
                Self::Known(s)
            }
            other => other,
        }
    }
}

fn label_set(labels: &label::Labels) -> BTreeSet<String> {
    labels.labels.iter().cloned().collect()
}

struct Walk<'a> {
    series: &'a Series,
    out: Analysis,
}

impl Walk<'_> {
    /// The labels of `expr`'s samples, recording what it selects and what is wrong.
    fn expr(&mut self, expr: &Expr) -> Labels {
        match expr {
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) => Labels::Scalar,
            Expr::Paren(e) => self.expr(&e.expr),
            Expr::Unary(e) => self.expr(&e.expr),
            Expr::Subquery(e) => self.expr(&e.expr),
            Expr::VectorSelector(vs) => self.selector(vs),
            Expr::MatrixSelector(ms) => self.selector(&ms.vs),
            Expr::Aggregate(a) => self.aggregate(a),
            Expr::Binary(b) => self.binary(b),
            Expr::Call(c) => self.call(c),
            Expr::Extension(_) => {
                self.out.problems.push("an extension expression".to_owned());
                Labels::Unknown
            }
        }
    }

    fn selector(&mut self, vs: &VectorSelector) -> Labels {
        let all = vs.matchers.matchers.iter();
        let all = all.chain(vs.matchers.or_matchers.iter().flatten());
        let mut name = vs.name.clone();
        let mut matchers = Vec::new();
        for m in all {
            if m.name == label::METRIC_NAME && m.op == MatchOp::Equal && name.is_none() {
                name = Some(m.value.clone());
            } else {
                matchers.push((m.name.clone(), m.op.to_string(), m.value.clone()));
            }
        }
        let Some(metric) = name else {
            self.out.problems.push(format!(
                "a selector without a metric name ({vs}): name the metric"
            ));
            return Labels::Unknown;
        };
        let labels = match self.series.get(&metric) {
            None => {
                let hint = if self.series.contains_key(&format!("{metric}_count")) {
                    " (a histogram: query its _bucket, _sum or _count series)"
                } else if self.series.contains_key(&format!("{metric}_total")) {
                    " (a counter: its samples are named with _total)"
                } else {
                    ""
                };
                self.out.problems.push(format!(
                    "metric `{metric}` is not documented in docs/metrics.md{hint}"
                ));
                Labels::Unknown
            }
            Some(documented) => {
                for (label, _, _) in &matchers {
                    if !documented.contains(label) {
                        self.out.problems.push(format!(
                            "{metric}{{{label}...}}: `{label}` is not a documented label of \
                             {metric}"
                        ));
                    }
                }
                Labels::Known(documented.clone())
            }
        };
        self.out.selectors.push(Selector { metric, matchers });
        labels
    }

    fn aggregate(&mut self, a: &AggregateExpr) -> Labels {
        let op = a.op.to_string();
        let param = a.param.as_deref().map(|p| (p, self.expr(p)));
        let vector = self.expr(&a.expr);
        if matches!(vector, Labels::Scalar) {
            self.out
                .problems
                .push(format!("{op}(...) aggregates a scalar"));
        }
        if let Some(m) = &a.modifier {
            let (by, labels) = (m.is_include(), label_set(m.labels()));
            for l in &labels {
                if !vector.has(l) {
                    let clause = if by { "by" } else { "without" };
                    self.out.problems.push(format!(
                        "{op} {clause} ({l}): `{l}` is not a documented label of what it \
                         aggregates"
                    ));
                }
            }
            if by {
                self.out.groupings.push(labels);
            }
        }
        if matches!(a.op.id(), T_TOPK | T_BOTTOMK | T_LIMITK | T_LIMIT_RATIO) {
            return vector; // these keep the input series; the grouping only scopes the pick
        }
        let grouped = match (&a.modifier, vector) {
            (_, Labels::Unknown) => Labels::Unknown,
            (Some(LabelModifier::Include(l)), _) => Labels::Known(label_set(l)),
            (Some(LabelModifier::Exclude(l)), v) => v.without(&label_set(l)),
            (None, _) => Labels::Known(BTreeSet::new()),
        };
        // count_values("label", v) adds the label it counts by.
        match param {
            Some((Expr::StringLiteral(s), _)) if a.op.id() == T_COUNT_VALUES => {
                grouped.with([s.val.clone()])
            }
            _ => grouped,
        }
    }

    /// The labels of `lhs op rhs`, checking the labels `on`/`ignoring`/`group_*` name.
    fn binary(&mut self, b: &BinaryExpr) -> Labels {
        let lhs = self.expr(&b.lhs);
        let rhs = self.expr(&b.rhs);
        let matching = b.modifier.as_ref().and_then(|m| m.matching.as_ref());
        let card = b.modifier.as_ref().map(|m| &m.card);
        if let Some(m) = matching {
            for l in &m.labels().labels {
                let (clause, ok) = if m.is_include() {
                    ("on", lhs.has(l) && rhs.has(l))
                } else {
                    ("ignoring", lhs.has(l) || rhs.has(l))
                };
                if !ok {
                    self.out.problems.push(format!(
                        "{clause}({l}): `{l}` is not a documented label of the operands"
                    ));
                }
            }
        }
        // group_left(extra) copies `extra` from the right side, group_right from the left.
        let group = match card {
            Some(VectorMatchCardinality::ManyToOne(extra)) => Some((true, label_set(extra))),
            Some(VectorMatchCardinality::OneToMany(extra)) => Some((false, label_set(extra))),
            _ => None,
        };
        if let Some((left, extra)) = &group {
            let one_side = if *left { &rhs } else { &lhs };
            for l in extra.iter().filter(|l| !one_side.has(l)) {
                let side = if *left { "left" } else { "right" };
                self.out.problems.push(format!(
                    "group_{side}({l}): `{l}` is not a documented label"
                ));
            }
        }
        match (lhs, rhs) {
            (Labels::Scalar, r) => r,
            (l, Labels::Scalar) => l,
            (Labels::Unknown, _) | (_, Labels::Unknown) => Labels::Unknown,
            (Labels::Known(l), Labels::Known(r)) => match (matching, group) {
                _ if b.op.id() == T_LOR => Labels::Known(l.union(&r).cloned().collect()),
                _ if b.op.is_set_operator() => Labels::Known(l),
                (_, Some((true, extra))) => Labels::Known(l).with(extra),
                (_, Some((false, extra))) => Labels::Known(r).with(extra),
                (Some(LabelModifier::Include(on)), None) => {
                    Labels::Known(l.intersection(&label_set(on)).cloned().collect())
                }
                (Some(LabelModifier::Exclude(ignoring)), None) => {
                    Labels::Known(l).without(&label_set(ignoring))
                }
                (None, None) => Labels::Known(l),
            },
        }
    }

    fn call(&mut self, c: &Call) -> Labels {
        let name = c.func.name;
        let mut strings = Vec::new();
        let mut vector = None;
        for arg in &c.args.args {
            match &**arg {
                Expr::StringLiteral(s) => strings.push(s.val.as_str()),
                e => {
                    let labels = self.expr(e);
                    if vector.is_none() && !matches!(labels, Labels::Scalar) {
                        vector = Some(labels);
                    }
                }
            }
        }
        let vector = vector.unwrap_or(Labels::Scalar);
        match name {
            _ if c.func.return_type == ValueType::Scalar => Labels::Scalar,
            "vector" => Labels::Known(BTreeSet::new()),
            "label_replace" | "label_join" => {
                // label_replace(v, dst, replacement, src, regex);
                // label_join(v, dst, separator, src...)
                let Some((dst, rest)) = strings.split_first() else {
                    self.out
                        .problems
                        .push(format!("{name} without a destination label"));
                    return vector;
                };
                let sources: Vec<&str> = if name == "label_replace" {
                    rest.get(1).copied().into_iter().collect()
                } else {
                    rest.iter().skip(1).copied().collect()
                };
                for src in sources.into_iter().filter(|s| !s.is_empty()) {
                    if !vector.has(src) {
                        self.out.problems.push(format!(
                            "{name} reads `{src}`, not a documented label of its vector"
                        ));
                    }
                }
                vector.with([(*dst).to_owned()])
            }
            "histogram_quantile" | "histogram_fraction" => {
                if !vector.has("le") {
                    self.out.problems.push(format!(
                        "{name} over a vector without `le` (aggregate buckets `by (le, ...)`)"
                    ));
                }
                vector.without(&BTreeSet::from(["le".to_owned()]))
            }
            _ => vector,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn workbook_is_a_valid_notebook() {
    let wb = workbook();
    let problems = notebook_problems(&wb);
    assert!(
        problems.is_empty(),
        "bicep/workbooks/trellis-mesh.workbook.json is not a valid workbook:\n{}",
        problems.join("\n")
    );
    // The checks above saw the content they are about.
    let items = all_items(&wb);
    assert!(items.len() > 10, "only {} items", items.len());
    assert!(!parameters(&wb).is_empty(), "no parameters");
}

#[test]
fn workbook_parameters_are_defined_before_use() {
    let wb = workbook();
    let problems = reference_problems(&wb);
    assert!(
        problems.is_empty(),
        "parameter references that do not resolve:\n{}",
        problems.join("\n")
    );
}

#[test]
fn workbook_promql_uses_only_documented_metrics_and_labels() {
    let wb = workbook();
    let series = series();
    // The doc parsed into what the queries need: a request family with its mesh labels.
    let server = &series["http_server_request_duration_seconds_count"];
    for label in [
        "destination_workload",
        "source_workload",
        "http_response_status_code",
    ] {
        assert!(server.contains(label), "docs/metrics.md parse lost {label}");
    }
    assert!(series["http_server_request_duration_seconds_bucket"].contains("le"));
    let queries = promql_queries(&wb);
    assert!(queries.len() >= 10, "only {} PromQL queries", queries.len());
    let problems = promql_problems(&wb, &series);
    assert!(
        problems.is_empty(),
        "PromQL in the workbook that docs/metrics.md does not back:\n{}",
        problems.into_iter().collect::<Vec<_>>().join("\n")
    );
}

/// The check above fails for what it is meant to catch.
#[test]
fn workbook_check_rejects_undocumented_metrics_and_labels() {
    let series = series();
    let bad = [
        (
            "rate(trellis_proxy_certificate_expiry_seconds[5m])",
            "`trellis_proxy_certificate_expiry_seconds` is not documented",
        ),
        (
            "http_server_request_duration_seconds",
            "a histogram: query its _bucket",
        ),
        (
            "trellis_discovery_pushes",
            "a counter: its samples are named with _total",
        ),
        (
            "http_server_request_duration_seconds_count{route=\"/cart\"}",
            "`route` is not a documented label",
        ),
        (
            "http_server_request_duration_seconds_count{le=\"0.5\"}",
            "`le` is not a documented label",
        ),
        (
            "sum by (pod) (rate(http_server_request_duration_seconds_count[5m]))",
            "by (pod)",
        ),
        (
            "histogram_quantile(0.99, sum by (destination_workload) \
             (rate(http_server_request_duration_seconds_bucket[5m])))",
            "without `le`",
        ),
        (
            "sum by (le) (rate(http_server_request_duration_seconds_count[5m]))",
            "by (le)",
        ),
        (
            "trellis_ca_generation * on(pod) trellis_ca_trust_roots",
            "on(pod)",
        ),
        (
            "label_replace(trellis_ca_generation, \"x\", \"$1\", \"instance\", \"(.*)\")",
            "reads `instance`",
        ),
        (
            "{destination_workload=\"web\"}",
            "a selector without a metric name",
        ),
        (
            "{__name__=\"trellis_discovery_pushes\"}",
            "a counter: its samples are named with _total",
        ),
        (
            "sum without (pod) (rate(http_server_request_duration_seconds_count[5m]))",
            "without (pod)",
        ),
        (
            "trellis_ca_generation * ignoring(pod) trellis_ca_trust_roots",
            "ignoring(pod)",
        ),
        (
            "trellis_ca_generation * on() group_left(pod) trellis_ca_trust_roots",
            "group_left(pod)",
        ),
        (
            "label_join(trellis_ca_generation, \"x\", \",\", \"instance\")",
            "label_join reads `instance`",
        ),
        (
            "max_over_time(http_server_request_duration_seconds_count{route=\"/x\"}[5m:1m])",
            "`route` is not a documented label",
        ),
    ];
    for (query, want) in bad {
        let analysis = analyze(query, &series).expect(query);
        let all = analysis.problems.join("\n");
        assert!(
            all.contains(want),
            "{query}: want a problem with {want:?}, got {all:?}"
        );
    }
    // Syntax is promql-parser's to judge: each of these is an `Err`, with its reason.
    for (syntax_error, want) in [
        (
            "sum(rate(http_server_request_duration_seconds_count[5m])",
            "unclosed left parenthesis",
        ),
        (
            "rate(http_server_request_duration_seconds_count[5 minutes])",
            "inside brackets",
        ),
        (
            "rat(http_server_request_duration_seconds_count[5m])",
            "unknown function with name 'rat'",
        ),
        (
            "http_server_request_duration_seconds_count or or trellis_ca_generation",
            "invalid promql query",
        ),
    ] {
        let e = analyze(syntax_error, &series).expect_err(syntax_error);
        assert!(
            format!("{e:#}").contains(want),
            "{syntax_error}: want an error with {want:?}, got {e:#}"
        );
    }
    for good in [
        "sum by (le, destination_workload) (rate(http_server_request_duration_seconds_bucket[5m]))",
        "label_replace(trellis_ca_generation < 3, \"status\", \"critical\", \"\", \"\") \
         or ignoring(status) trellis_ca_generation",
        "sum without (http_request_method) \
         (increase(http_client_request_duration_seconds_count[1h]))",
        "min(trellis_proxy_certificate_expiration_timestamp_seconds > 0) - time()",
    ] {
        let analysis = analyze(good, &series).expect(good);
        assert!(
            analysis.problems.is_empty(),
            "{good}: {:?}",
            analysis.problems
        );
    }

    // The same on the workbook itself: one planted undocumented name makes it fail.
    let planted = WORKBOOK.replace(
        "trellis_ca_signing_expiry_timestamp_seconds",
        "trellis_ca_signing_expiry_seconds",
    );
    assert_ne!(
        planted, WORKBOOK,
        "the workbook does not query the CA expiry"
    );
    let planted: Value = serde_json::from_str(&planted).unwrap();
    let problems = promql_problems(&planted, &series);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("`trellis_ca_signing_expiry_seconds` is not documented")),
        "a planted undocumented metric passed: {problems:?}"
    );
}

#[test]
fn workbook_shows_golden_signals_edges_certificates_and_traces() {
    let wb = workbook();
    let series = series();
    let mut values: BTreeMap<String, String> = parameter_values(&wb)
        .into_iter()
        .filter_map(|(k, v)| Some((k, v.into_iter().next()?)))
        .collect();
    values.insert("Namespace".to_owned(), NAMESPACE_SENTINEL.to_owned());
    let mut analyses = Vec::new();
    for (name, text) in promql_queries(&wb) {
        let q = substitute(&text, &values).unwrap();
        analyses.push((name, text, analyze(&q, &series).unwrap()));
    }
    let selected: BTreeSet<&str> = analyses
        .iter()
        .flat_map(|(_, _, a)| a.selectors.iter().map(|s| s.metric.as_str()))
        .collect();
    for metric in [
        "http_client_request_duration_seconds_count",
        "http_client_request_duration_seconds_bucket",
        "http_server_request_duration_seconds_count",
        "http_server_request_duration_seconds_bucket",
        "trellis_proxy_certificate_expiration_timestamp_seconds",
        "trellis_ca_signing_expiry_timestamp_seconds",
    ] {
        assert!(selected.contains(metric), "no query reads {metric}");
    }

    // The namespace filter applies to every request series read.
    for (name, _, a) in &analyses {
        for s in a.selectors.iter().filter(|s| s.metric.starts_with("http_")) {
            let filtered = s.matchers.iter().any(|(label, op, value)| {
                label.ends_with("namespace") && op == "=~" && value == NAMESPACE_SENTINEL
            });
            assert!(
                filtered,
                "{name}: {} ignores the namespace filter",
                s.metric
            );
        }
    }

    // Grouped by destination service, by workload, by route, and by edge.
    let groupings: Vec<&BTreeSet<String>> = analyses
        .iter()
        .flat_map(|(_, _, a)| a.groupings.iter())
        .collect();
    for want in [
        &["destination_service_namespace", "destination_service_name"][..],
        &["destination_namespace", "destination_workload"],
        &["route_namespace", "route_name"],
        &[
            "source_namespace",
            "source_workload",
            "destination_namespace",
            "destination_workload",
        ],
    ] {
        let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
        assert!(
            groupings.iter().any(|g| **g == want),
            "no query groups by {want:?}"
        );
    }

    // Success rate counts 5xx; p50, p95 and p99 on both sides.
    for family in [
        "http_client_request_duration_seconds",
        "http_server_request_duration_seconds",
    ] {
        let counts_5xx = analyses.iter().any(|(_, _, a)| {
            a.selectors.iter().any(|s| {
                s.metric == format!("{family}_count")
                    && s.matchers.iter().any(|(l, op, v)| {
                        l == "http_response_status_code" && op == "=~" && v == "5.."
                    })
            })
        });
        assert!(counts_5xx, "no success rate over {family}");
        for q in ["0.5", "0.95", "0.99"] {
            let found = analyses.iter().any(|(_, text, _)| {
                text.contains(&format!("histogram_quantile({q},"))
                    && text.contains(&format!("{family}_bucket"))
            });
            assert!(found, "no p{q} latency over {family}");
        }
    }

    // Certificate thresholds are drawn from a status label.
    let statuses = analyses
        .iter()
        .filter(|(_, text, _)| text.contains("\"critical\"") && text.contains("\"warning\""))
        .count();
    assert_eq!(
        statuses, 2,
        "want the proxy and CA expiry tables with thresholds"
    );

    // The trace view: requests and dependencies per cloud role, from Application Insights.
    let logs: Vec<&str> = all_items(&wb)
        .into_iter()
        .filter(|i| i.pointer("/content/queryType").and_then(Value::as_u64) == Some(QUERY_LOGS))
        .filter_map(|i| i.pointer("/content/query").and_then(Value::as_str))
        .collect();
    for table in ["requests", "dependencies"] {
        assert!(
            logs.iter()
                .any(|q| q.trim_start().starts_with(table) && q.contains("cloud_RoleName")),
            "no KQL query of {table} by cloud_RoleName"
        );
    }

    // Parameters, and the route group: RPS, success rate and p50/p95/p99 per route.
    let kinds: BTreeMap<&str, u64> = parameters(&wb)
        .into_iter()
        .filter_map(|p| Some((p.get("name")?.as_str()?, p.get("type")?.as_u64()?)))
        .collect();
    assert_eq!(kinds.get("TimeRange"), Some(&TIME_RANGE));
    assert!(kinds.contains_key("Namespace"), "no namespace filter");
    let route = all_items(&wb)
        .into_iter()
        .find(|i| item_name(i) == "by-route")
        .expect("no by-route group for route-level signals");
    assert_eq!(route.get("type").and_then(Value::as_u64), Some(12));
    let route_queries: Vec<&str> = route
        .pointer("/content/items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| i.pointer("/content/query").and_then(Value::as_str))
        .collect();
    assert_eq!(route_queries.len(), 5, "{route_queries:?}");
    for q in &route_queries {
        assert!(
            q.contains("sum by (route_namespace, route_name)")
                || q.contains("sum by (le, route_namespace, route_name)"),
            "not grouped by route: {q}"
        );
        assert!(
            q.contains(r#"route_name!=\"\""#),
            "unrouted requests not left out: {q}"
        );
    }
}
