//! The operations kit in deploy/: the Grafana dashboard and the Prometheus
//! rules name only metrics, labels and label values that the proxy exports
//! (the names from src/ops/metrics.rs, the labels from README's metric
//! table), every alert says how bad it is and what to do, and promtool
//! accepts the rules and the dashboard's queries and runs the rules' unit
//! tests. promtool is installed by deploy/prometheus/install-promtool.sh when
//! it is missing.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use rlsgate::config::Config;
use serde_json::Value as Json;
use serde_norway::Value as Yaml;

use crate::support::{Harness, http_get};

const DASHBOARD: &str = "deploy/grafana/rlsgate.json";
const RULES: &str = "deploy/prometheus/rlsgate-rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/rlsgate-rules.test.yml";
const INSTALL_PROMTOOL: &str = "deploy/prometheus/install-promtool.sh";
const PROMTOOL_HINT: &str = "run `bash deploy/prometheus/install-promtool.sh` as root (it takes promtool \
     from Debian's prometheus package), or put promtool from a Prometheus release on PATH";

/// Labels Prometheus gives every series it scrapes.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];
/// Series that Prometheus itself (`up`) and a blackbox exporter probing
/// /readyz (`probe_success`) make, not the proxy: only target labels.
const SCRAPE_SERIES: [&str; 2] = ["up", "probe_success"];
const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];
const SEVERITIES: [&str; 3] = ["critical", "warning", "info"];

const AGGREGATIONS: [&str; 14] = [
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
const CLAUSES: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const WORDS: [&str; 10] = [
    "and", "or", "unless", "bool", "offset", "atan2", "Inf", "NaN", "inf", "nan",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

fn dashboard() -> Json {
    serde_json::from_str(&read(DASHBOARD))
        .unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

fn yaml(path: &str) -> Yaml {
    serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

fn text(value: &Yaml) -> &str {
    value.as_str().unwrap_or("")
}

// ---- What the proxy exports ----

/// What README's metric table says of one series name: its labels, each
/// with the values the table lists (none listed: any value).
#[derive(Clone, Default)]
struct Documented {
    labels: BTreeMap<String, BTreeSet<String>>,
}

/// The metric names of src/ops/metrics.rs: its `const NAME: &str = "rlsgate_…";` lines.
fn exported_names() -> BTreeSet<String> {
    let source = read("src/ops/metrics.rs");
    let names: BTreeSet<String> = source
        .lines()
        .filter(|line| line.contains("const ") && line.contains(": &str = \"rlsgate_"))
        .filter_map(|line| line.split('"').nth(1).map(str::to_owned))
        .collect();
    assert!(
        names.len() >= 10,
        "found only {names:?} in src/ops/metrics.rs: has the way it names metrics changed?"
    );
    names
}

/// README's table: each metric name with its type and what it documents.
fn readme_table() -> BTreeMap<String, (String, Documented)> {
    let readme = read("README.md");
    let start = readme
        .find("| metric | type | labels |")
        .expect("README.md has the metric table (| metric | type | labels |)");
    let mut table = BTreeMap::new();
    for line in readme[start..].lines().skip(2) {
        let Some(row) = line.strip_prefix('|') else {
            break;
        };
        let cells: Vec<&str> = row.trim_end_matches('|').splitn(3, '|').collect();
        let [names, kind, labels] = cells[..] else {
            panic!("README metric table row without three cells: {line}");
        };
        let documented = Documented {
            labels: documented_labels(labels),
        };
        for name in backticked(names) {
            table.insert(name, (kind.trim().to_owned(), documented.clone()));
        }
    }
    table
}

fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The labels of one table cell, such as "`role`, `outcome`: `ok`, `error`;
/// `status` (499 …)": label names are the backticked words; those after a
/// colon (up to a semicolon) or in parentheses are the values of the label
/// before them.
fn documented_labels(cell: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let (mut current, mut listing, mut depth) = (None::<String>, false, 0);
    let mut chars = cell.chars();
    while let Some(c) = chars.next() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ':' if depth == 0 => listing = true,
            ';' if depth == 0 => listing = false,
            '`' => {
                let word: String = chars.by_ref().take_while(|&c| c != '`').collect();
                match &current {
                    Some(label) if listing || depth > 0 => {
                        labels.entry(label.clone()).or_default().insert(word);
                    }
                    _ => {
                        labels.entry(word.clone()).or_default();
                        current = Some(word);
                    }
                }
            }
            _ => {}
        }
    }
    labels
}

/// Every series name the proxy exports (a histogram as its `_bucket`,
/// `_sum` and `_count`), with its documented labels.
fn catalogue() -> BTreeMap<String, Documented> {
    let table = readme_table();
    let mut catalogue = BTreeMap::new();
    for name in exported_names() {
        let (kind, documented) = table.get(&name).unwrap_or_else(|| {
            panic!("{name} (src/ops/metrics.rs) is not in README's metric table, so its labels are unknown")
        });
        if kind == "histogram" {
            for suffix in HISTOGRAM_SUFFIXES {
                let mut series = documented.clone();
                if suffix == "_bucket" {
                    series.labels.insert("le".to_owned(), BTreeSet::new());
                }
                catalogue.insert(format!("{name}{suffix}"), series);
            }
        } else {
            catalogue.insert(name, documented.clone());
        }
    }
    catalogue
}

// ---- PromQL, as far as names and labels go ----

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Punct(char),
    Op(char),
    Other,
}

/// PromQL (with Grafana's `$variables`) as tokens; ranges (`[5m]`), numbers
/// and variables are kept only as placeholders.
fn tokenize(expr: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = expr.chars().peekable();
    let word = |c: &char| c.is_ascii_alphanumeric() || *c == '_' || *c == ':';
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {}
            '#' => while chars.next_if(|&c| c != '\n').is_some() {},
            '"' | '\'' | '`' => {
                let mut value = String::new();
                while let Some(next) = chars.next().filter(|&n| n != c) {
                    value.push(if next == '\\' {
                        chars.next().unwrap_or(next)
                    } else {
                        next
                    });
                }
                tokens.push(Token::Str(value));
            }
            '[' => {
                while chars.next_if(|&c| c != ']').is_some() {}
                chars.next();
                tokens.push(Token::Other);
            }
            '$' => {
                if chars.next_if_eq(&'{').is_some() {
                    while chars.next_if(|&c| c != '}').is_some() {}
                    chars.next();
                }
                while chars.next_if(word).is_some() {}
                tokens.push(Token::Other);
            }
            c if c.is_ascii_digit() || c == '.' => {
                while chars
                    .next_if(|c| c.is_ascii_alphanumeric() || *c == '.')
                    .is_some()
                {}
                tokens.push(Token::Other);
            }
            c if word(&c) => {
                let mut ident = c.to_string();
                while let Some(c) = chars.next_if(word) {
                    ident.push(c);
                }
                tokens.push(Token::Ident(ident));
            }
            '(' | ')' | '{' | '}' | ',' => tokens.push(Token::Punct(c)),
            _ => tokens.push(Token::Op(c)),
        }
    }
    tokens
}

/// A label matcher: label, operator, value.
type Matcher = (String, String, String);

/// A series selector: its metric name, matchers and where it is among the
/// tokens.
#[derive(Debug)]
struct Selector {
    metric: String,
    matchers: Vec<Matcher>,
    at: usize,
}

/// Labels named by `by`/`without` (with the tokens of the aggregated
/// expression) or by `on`/`ignoring`/`group_*` (scope `None`).
#[derive(Debug)]
struct Grouping {
    labels: Vec<String>,
    scope: Option<Range<usize>>,
}

#[derive(Debug, Default)]
struct Scan {
    selectors: Vec<Selector>,
    groupings: Vec<Grouping>,
}

fn ident(token: Option<&Token>) -> Option<&str> {
    match token {
        Some(Token::Ident(w)) => Some(w),
        _ => None,
    }
}

/// The index of the `)` that closes the `(` at `open`.
fn closing(tokens: &[Token], open: usize) -> Result<usize, String> {
    let mut depth = 0;
    for (i, token) in tokens.iter().enumerate().skip(open) {
        match token {
            Token::Punct('(') => depth += 1,
            Token::Punct(')') if depth == 1 => return Ok(i),
            Token::Punct(')') => depth -= 1,
            _ => {}
        }
    }
    Err("unbalanced parentheses".to_owned())
}

/// The index of the `(` that the `)` at `close` closes.
fn opening(tokens: &[Token], close: usize) -> Result<usize, String> {
    let mut depth = 0;
    for i in (0..=close).rev() {
        match tokens[i] {
            Token::Punct(')') => depth += 1,
            Token::Punct('(') if depth == 1 => return Ok(i),
            Token::Punct('(') => depth -= 1,
            _ => {}
        }
    }
    Err("unbalanced parentheses".to_owned())
}

/// The metric selectors and label groupings of a PromQL expression.
fn scan(expr: &str) -> Result<Scan, String> {
    let tokens = tokenize(expr);
    let mut found = Scan::default();
    let mut i = 0;
    while i < tokens.len() {
        let next_opens = tokens.get(i + 1) == Some(&Token::Punct('('));
        match &tokens[i] {
            Token::Ident(w) if CLAUSES.contains(&w.as_str()) && next_opens => {
                let close = closing(&tokens, i + 1)?;
                let labels = tokens[i + 2..close]
                    .iter()
                    .filter_map(|t| ident(Some(t)).map(str::to_owned))
                    .collect();
                let scope = match w.as_str() {
                    "by" | "without" => Some(aggregated(&tokens, i, close)?),
                    _ => None,
                };
                found.groupings.push(Grouping { labels, scope });
                i = close;
            }
            Token::Ident(w)
                if next_opens
                    || CLAUSES.contains(&w.as_str())
                    || AGGREGATIONS.contains(&w.as_str())
                    || WORDS.contains(&w.as_str()) => {}
            Token::Ident(metric) => {
                let (matchers, end) = matchers(&tokens, i + 1)?;
                found.selectors.push(Selector {
                    metric: metric.clone(),
                    matchers,
                    at: i,
                });
                i = end;
            }
            Token::Punct('{') => return Err("a selector without a metric name".to_owned()),
            _ => {}
        }
        i += 1;
    }
    Ok(found)
}

/// The tokens an aggregation's `by (…)` at `clause` (its list closing at
/// `close`) applies to: `sum by (l) (…)` or `sum (…) by (l)`.
fn aggregated(tokens: &[Token], clause: usize, close: usize) -> Result<Range<usize>, String> {
    if clause > 0 && tokens[clause - 1] == Token::Punct(')') {
        return Ok(opening(tokens, clause - 1)?..clause);
    }
    let open = close + 1;
    if tokens.get(open) != Some(&Token::Punct('(')) {
        return Err(
            "by/without neither follows nor precedes a parenthesised expression".to_owned(),
        );
    }
    Ok(open..closing(tokens, open)? + 1)
}

/// The matchers of a selector, if `{` is at `at`, and the last token read.
fn matchers(tokens: &[Token], at: usize) -> Result<(Vec<Matcher>, usize), String> {
    let mut found = Vec::new();
    if tokens.get(at) != Some(&Token::Punct('{')) {
        return Ok((found, at - 1));
    }
    let mut i = at + 1;
    loop {
        match tokens.get(i) {
            Some(Token::Punct('}')) => return Ok((found, i)),
            Some(Token::Punct(',')) => i += 1,
            Some(Token::Ident(label)) => {
                let mut op = String::new();
                i += 1;
                while let Some(Token::Op(c)) = tokens.get(i) {
                    op.push(*c);
                    i += 1;
                }
                let Some(Token::Str(value)) = tokens.get(i) else {
                    return Err(format!("matcher on {label} without a quoted value"));
                };
                found.push((label.clone(), op, value.clone()));
                i += 1;
            }
            other => return Err(format!("unexpected {other:?} in a selector")),
        }
    }
}

// ---- Checking expressions against the catalogue ----

/// The names an expression may use: the proxy's series, Prometheus's own,
/// and the rules' recorded series.
struct Known {
    series: BTreeMap<String, Documented>,
}

impl Known {
    fn proxy() -> Known {
        let mut series = catalogue();
        for name in SCRAPE_SERIES {
            series.insert(name.to_owned(), Documented::default());
        }
        Known { series }
    }

    /// With the recorded series of `rules`: labels as their `by` keeps
    /// them, with the values of the series they come from.
    fn with_recorded(mut self, rules: &Yaml) -> Known {
        for rule in rule_list(rules).filter(|r| r.get("record").is_some()) {
            let name = text(&rule["record"]).to_owned();
            assert!(
                name.contains(':'),
                "recorded series {name} lacks the level:metric:operation form"
            );
            let scan = scan(text(&rule["expr"])).unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut recorded = Documented::default();
            let kept = scan.groupings.iter().filter(|g| g.scope.is_some());
            for label in kept.flat_map(|g| g.labels.iter()).filter(|l| *l != "le") {
                let values = scan
                    .selectors
                    .iter()
                    .filter_map(|s| self.series.get(&s.metric)?.labels.get(label))
                    .flatten()
                    .cloned();
                recorded
                    .labels
                    .entry(label.clone())
                    .or_default()
                    .extend(values);
            }
            self.series.insert(name, recorded);
        }
        self
    }

    fn allows(&self, metric: &str, label: &str) -> bool {
        TARGET_LABELS.contains(&label)
            || self
                .series
                .get(metric)
                .is_some_and(|d| d.labels.contains_key(label))
    }

    /// What is wrong with `expr` (`what` names it in the messages).
    fn problems(&self, what: &str, expr: &str) -> Vec<String> {
        let scan = match scan(expr) {
            Ok(scan) => scan,
            Err(e) => return vec![format!("{what}: {e} in {expr}")],
        };
        let mut problems = Vec::new();
        if scan.selectors.is_empty() {
            problems.push(format!("{what}: no metric found in {expr}"));
        }
        for selector in &scan.selectors {
            problems.extend(self.selector_problems(what, selector));
        }
        for grouping in &scan.groupings {
            problems.extend(self.grouping_problems(what, grouping, &scan.selectors));
        }
        problems
    }

    fn selector_problems(&self, what: &str, selector: &Selector) -> Vec<String> {
        let metric = &selector.metric;
        let Some(documented) = self.series.get(metric) else {
            return vec![format!(
                "{what}: {metric} is not a metric the proxy exports"
            )];
        };
        let mut problems = Vec::new();
        for (label, op, value) in &selector.matchers {
            if !self.allows(metric, label) {
                problems.push(format!("{what}: {metric} has no label {label}"));
                continue;
            }
            let Some(listed) = documented.labels.get(label).filter(|v| !v.is_empty()) else {
                continue;
            };
            for value in matched_values(op, value) {
                if !listed.contains(&value) {
                    problems.push(format!(
                        "{what}: {metric}'s {label} is never {value:?} (README lists {listed:?})"
                    ));
                }
            }
        }
        problems
    }

    fn grouping_problems(
        &self,
        what: &str,
        grouping: &Grouping,
        selectors: &[Selector],
    ) -> Vec<String> {
        let mut problems = Vec::new();
        for label in &grouping.labels {
            let in_scope = selectors
                .iter()
                .filter(|s| grouping.scope.as_ref().is_none_or(|r| r.contains(&s.at)));
            let lacking: Vec<&str> = in_scope
                .clone()
                .filter(|s| !self.allows(&s.metric, label))
                .map(|s| s.metric.as_str())
                .collect();
            let bad = match grouping.scope {
                // by/without: every series aggregated must have it.
                Some(_) => !lacking.is_empty(),
                // on/ignoring/group_*: one side at least.
                None => lacking.len() == in_scope.count(),
            };
            if bad {
                problems.push(format!("{what}: groups by {label}, which {lacking:?} lack"));
            }
        }
        problems
    }
}

/// The values a matcher names, when they can be told: an exact value, or
/// an alternation of plain words; not one with a `$variable` or a pattern.
fn matched_values(op: &str, value: &str) -> Vec<String> {
    let plain = |v: &str| {
        !v.is_empty()
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '/'))
    };
    match op {
        "=" | "!=" => vec![value.to_owned()],
        _ if value.split('|').all(plain) => value.split('|').map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

// ---- The files ----

fn rule_list(rules: &Yaml) -> impl Iterator<Item = &Yaml> {
    let groups = rules["groups"]
        .as_sequence()
        .expect("the rules have groups");
    groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("a group has rules"))
}

fn alerts(rules: &Yaml) -> impl Iterator<Item = &Yaml> {
    rule_list(rules).filter(|r| r.get("alert").is_some())
}

/// Every `expr` of the dashboard, with the title of its panel.
fn dashboard_queries(dashboard: &Json) -> Vec<(String, String)> {
    fn walk(value: &Json, title: &str, found: &mut Vec<(String, String)>) {
        match value {
            Json::Object(map) => {
                let title = map.get("title").and_then(Json::as_str).unwrap_or(title);
                if let Some(expr) = map.get("expr").and_then(Json::as_str) {
                    found.push((title.to_owned(), expr.to_owned()));
                }
                map.values().for_each(|v| walk(v, title, found));
            }
            Json::Array(items) => items.iter().for_each(|v| walk(v, title, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    walk(&dashboard["panels"], "", &mut found);
    found
}

/// The dashboard's variables of type `query`: name, and its
/// `label_values(selector, label)` split into selector and label.
fn variable_queries(dashboard: &Json) -> Vec<(String, String, String)> {
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let mut found = Vec::new();
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        let name = variable["name"].as_str().unwrap_or("").to_owned();
        let query = variable["query"]["query"]
            .as_str()
            .or(variable["query"].as_str())
            .unwrap_or_else(|| panic!("variable {name} has no query"));
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| {
                panic!("variable {name}: not label_values(selector, label): {query}")
            });
        let (selector, label) = inner
            .rsplit_once(',')
            .expect("label_values(selector, label)");
        found.push((name, selector.trim().to_owned(), label.trim().to_owned()));
    }
    found
}

/// Base metric names (histograms without their suffix) that `exprs` name.
fn metrics_named<'a>(exprs: impl Iterator<Item = &'a str>) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for expr in exprs {
        for selector in scan(expr).map(|s| s.selectors).unwrap_or_default() {
            let metric = &selector.metric;
            let base = HISTOGRAM_SUFFIXES
                .iter()
                .find_map(|s| metric.strip_suffix(s))
                .unwrap_or(metric);
            names.insert(base.to_owned());
        }
    }
    names
}

fn assert_none(problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

// ---- promtool ----

/// promtool, installed by deploy/prometheus/install-promtool.sh if missing.
fn promtool() -> &'static str {
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(|| {
        let present = Command::new("promtool")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if present {
            return;
        }
        let out = Command::new("bash")
            .arg(repo().join(INSTALL_PROMTOOL))
            .stdin(Stdio::null())
            .output()
            .expect("run bash deploy/prometheus/install-promtool.sh");
        assert!(
            out.status.success(),
            "promtool is missing and {INSTALL_PROMTOOL} could not install it ({PROMTOOL_HINT}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
    "promtool"
}

fn run_promtool(args: &[&str], dir: &Path) -> Output {
    Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("promtool {args:?}: {e} ({PROMTOOL_HINT})"))
}

fn assert_promtool_ok(args: &[&str], dir: &Path) -> String {
    let out = run_promtool(args, dir);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "promtool {}:\n{stdout}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The rules as `promtool test rules` compares them: without the
/// descriptions (prose, edited freely; `promtool check rules` still checks
/// their templates).
fn rules_without_descriptions() -> String {
    let mut rules = yaml(RULES);
    let groups = rules["groups"]
        .as_sequence_mut()
        .expect("the rules have groups");
    for group in groups {
        let list = group["rules"].as_sequence_mut().expect("a group has rules");
        for rule in list {
            if let Some(annotations) = rule.get_mut("annotations").and_then(Yaml::as_mapping_mut) {
                annotations.remove("description");
            }
        }
    }
    serde_norway::to_string(&rules).expect("YAML out")
}

/// The dashboard's queries as recording rules, its variables replaced by
/// what Grafana would put there, for `promtool check rules` to parse.
fn dashboard_queries_as_rules() -> String {
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, (title, expr)) in dashboard_queries(&dashboard()).iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("\"$job\"", "\".*\"")
            .replace("\"$instance\"", "\".*\"");
        assert!(
            !expr.contains('$'),
            "panel {title:?}: a variable this test does not know in {expr}"
        );
        rules.push_str(&format!(
            "      - record: dashboard:panel_{n}\n        expr: {}\n",
            serde_json::to_string(&expr).expect("a JSON string is a YAML string")
        ));
    }
    rules
}

// ---- The tests ----

#[test]
fn the_dashboard_and_the_rules_name_only_metrics_labels_and_values_the_proxy_exports() {
    let rules = yaml(RULES);
    let known = Known::proxy().with_recorded(&rules);
    let mut problems = Vec::new();
    for rule in rule_list(&rules) {
        let name = text(
            rule.get("alert")
                .or(rule.get("record"))
                .expect("alert or record"),
        );
        problems.extend(known.problems(&format!("rule {name}"), text(&rule["expr"])));
    }
    let dashboard = dashboard();
    let queries = dashboard_queries(&dashboard);
    assert!(
        queries.len() >= 20,
        "only {} queries found in the dashboard",
        queries.len()
    );
    let proxy = Known::proxy();
    for (title, expr) in &queries {
        problems.extend(proxy.problems(&format!("panel {title:?}"), expr));
    }
    for (name, selector, label) in variable_queries(&dashboard) {
        let what = format!("variable {name}");
        problems.extend(known.problems(&what, &selector));
        let metric = scan(&selector)
            .map(|s| s.selectors[0].metric.clone())
            .unwrap_or_default();
        if !known.allows(&metric, &label) {
            problems.push(format!("{what}: {metric} has no label {label}"));
        }
    }
    assert_none(problems);
}

#[test]
fn the_checks_catch_a_misspelt_metric_label_or_value() {
    let known = Known::proxy();
    for bad in [
        "rate(rlsgate_refusal_total[5m])",
        "rlsgate_refusals_total{reasn=\"expired\"}",
        "rlsgate_refusals_total{reason=\"expird\"}",
        "rlsgate_refusals_total{reason=~\"expired|bad_signatur\"}",
        "sum by (role) (rate(rlsgate_refusals_total[5m]))",
        "histogram_quantile(0.9, sum by (le) (rate(rlsgate_token_verification_seconds[5m])))",
        "rlsgate_client_sessions_active / ignoring (rol) rlsgate_client_connections_active",
        "sum(rate(rlsgate_jwks_fetches_total[5m])) by (kid)",
    ] {
        assert!(
            !known.problems("bad", bad).is_empty(),
            "no problem found in {bad}"
        );
    }
    let good = "sum by (reason) (rate(rlsgate_refusals_total{reason=~\"expired|upstream\", job=~\"$job\"}[$__rate_interval])) \
                / ignoring (reason) group_left sum(rate(rlsgate_token_verification_seconds_count[5m]))";
    assert_none(known.problems("good", good));
}

#[test]
fn the_dashboard_shows_every_exported_metric_for_the_chosen_jobs_and_replicas() {
    let dashboard = dashboard();
    let queries = dashboard_queries(&dashboard);
    let shown = metrics_named(queries.iter().map(|(_, e)| e.as_str()));
    let missing: Vec<String> = exported_names().difference(&shown).cloned().collect();
    assert!(missing.is_empty(), "no panel shows {missing:?}");

    let mut problems = Vec::new();
    for (title, expr) in &queries {
        for selector in scan(expr).expect("scanned above").selectors {
            for variable in ["job", "instance"] {
                let wanted = (variable.to_owned(), "=~".to_owned(), format!("${variable}"));
                if !selector.matchers.contains(&wanted) {
                    problems.push(format!(
                        "panel {title:?}: {} lacks {variable}=~\"${variable}\"",
                        selector.metric
                    ));
                }
            }
        }
    }
    assert_none(problems);

    let variables: BTreeMap<&str, &Json> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| (v["name"].as_str().unwrap_or(""), v))
        .collect();
    assert_eq!(variables["datasource"]["type"], "datasource");
    assert_eq!(variables["datasource"]["query"], "prometheus");
    for name in ["job", "instance"] {
        let v = variables
            .get(name)
            .unwrap_or_else(|| panic!("no variable {name}"));
        assert!(
            v["multi"] == true && v["includeAll"] == true,
            "{name}: pick several, or all"
        );
    }
    let sources = dashboard
        .to_string()
        .matches("\"uid\":\"${datasource}\"")
        .count();
    let prometheus = dashboard
        .to_string()
        .matches("\"type\":\"prometheus\"")
        .count();
    assert_eq!(
        sources, prometheus,
        "every Prometheus query goes to the chosen data source"
    );
}

#[test]
fn every_alert_says_how_bad_it_is_and_what_to_do_and_a_unit_test_fires_it() {
    let rules = yaml(RULES);
    let tested = fired_in_unit_tests();
    let mut names = BTreeSet::new();
    let mut problems = Vec::new();
    for alert in alerts(&rules) {
        let name = text(&alert["alert"]);
        if !names.insert(name) {
            problems.push(format!("{name}: two alerts by that name"));
        }
        if text(&alert["for"]).is_empty() {
            problems.push(format!("{name}: no for:"));
        }
        if !SEVERITIES.contains(&text(&alert["labels"]["severity"])) {
            problems.push(format!("{name}: severity is not one of {SEVERITIES:?}"));
        }
        let summary = text(&alert["annotations"]["summary"]);
        let description = text(&alert["annotations"]["description"]);
        if summary.is_empty() || description.len() < 2 * summary.len() {
            problems.push(format!(
                "{name}: needs a summary, and a description that says what to do"
            ));
        }
        if !tested.contains(name) {
            problems.push(format!(
                "{name}: no case in {RULE_TESTS} expects it to fire"
            ));
        }
    }
    assert!(names.len() >= 10, "only {} alerts", names.len());
    assert_none(problems);
}

/// The alerts that some case of the rules' unit tests expects to fire.
fn fired_in_unit_tests() -> BTreeSet<String> {
    let tests = yaml(RULE_TESTS);
    let cases = tests["tests"].as_sequence().expect("tests");
    cases
        .iter()
        .flat_map(|case| case["alert_rule_test"].as_sequence().into_iter().flatten())
        .filter(|t| t["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty()))
        .map(|t| text(&t["alertname"]).to_owned())
        .collect()
}

#[test]
fn promtool_accepts_the_rules_and_every_dashboard_query() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = assert_promtool_ok(
        &["check", "rules", &repo().join(RULES).to_string_lossy()],
        dir.path(),
    );
    assert!(out.contains("SUCCESS"), "{out}");
    fs::write(
        dir.path().join("dashboard.yml"),
        dashboard_queries_as_rules(),
    )
    .unwrap();
    assert_promtool_ok(&["check", "rules", "dashboard.yml"], dir.path());
}

#[test]
fn the_alerts_fire_on_their_unit_tests_series_and_not_on_the_near_misses() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    fs::write(
        dir.path().join("rlsgate-rules.yml"),
        rules_without_descriptions(),
    )
    .unwrap();
    fs::copy(
        repo().join(RULE_TESTS),
        dir.path().join("rlsgate-rules.test.yml"),
    )
    .unwrap();
    let out = assert_promtool_ok(&["test", "rules", "rlsgate-rules.test.yml"], dir.path());
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn the_stale_keys_alert_fires_past_the_default_jwks_max_age() {
    let config = Config::parse(&format!(
        "{}\n[[provider]]\nissuer = \"https://idp.example.com/\"\n",
        crate::docs::MINIMAL_CONFIG
    ))
    .expect("a minimal configuration");
    let max_age = config.providers[0].jwks_max_age.as_secs();
    let rules = yaml(RULES);
    let stale = alerts(&rules)
        .find(|a| text(&a["alert"]) == "RlsgateSigningKeysStale")
        .expect("an alert RlsgateSigningKeysStale");
    let expr = text(&stale["expr"]);
    assert!(
        expr.contains(&format!("(rlsgate_jwks_key_age_seconds) > {max_age}\n")),
        "RlsgateSigningKeysStale should fire past jwks_max_age's default, {max_age} s: {expr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_replica_is_listed_by_the_dashboard_and_exports_only_documented_labels() {
    let h = Harness::start_with_admin("").await;
    let (status, fresh) = http_get(&h.admin_url("/metrics")).await;
    assert_eq!(status, 200, "{fresh}");
    // The job and replica lists come from this metric: a replica no client
    // has used yet must be in them.
    for (name, selector, _) in variable_queries(&dashboard()) {
        let metric = scan(&selector).expect("a selector").selectors[0]
            .metric
            .clone();
        assert!(
            fresh.lines().any(|l| l.starts_with(&format!("{metric} "))),
            "variable {name} lists replicas by {metric}, which a fresh replica does not export:\n{fresh}"
        );
    }

    let client = h.connect_as("alice").await;
    h.connect_refused("authenticated", "not-a-token").await;
    drop(client);
    let (_, used) = http_get(&h.admin_url("/metrics")).await;
    let known = Known::proxy();
    let mut problems = Vec::new();
    for line in used.lines().filter(|l| l.starts_with("rlsgate_")) {
        let series = line.rsplit_once(' ').map_or(line, |(series, _)| series);
        problems.extend(known.problems(&format!("exported {series}"), series));
    }
    assert!(
        used.contains("reason=\"malformed\""),
        "the refusals are counted:\n{used}"
    );
    assert_none(problems);
}
