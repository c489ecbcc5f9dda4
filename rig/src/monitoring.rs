//! The operators' files of host-config/ (the Prometheus alert rules and the Grafana dashboard)
//! against what the daemon really exports: every metric name they use must be in a scrape.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};

/// host-config/prometheus/vhost-card.rules.yml
pub fn rules_file() -> PathBuf {
    crate::paths::workspace_root().join("host-config/prometheus/vhost-card.rules.yml")
}

/// host-config/grafana/vhost-card.json
pub fn dashboard_file() -> PathBuf {
    crate::paths::workspace_root().join("host-config/grafana/vhost-card.json")
}

/// The daemon's metric names (`vhost_card_*`, `process_*`) that `text` mentions.
pub fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut rest = text;
    while let Some(start) = rest.find(|c: char| is_name(c)) {
        let tail = &rest[start..];
        let end = tail.find(|c: char| !is_name(c)).unwrap_or(tail.len());
        let word = &tail[..end];
        let starts_a_word = start == 0 || !rest[..start].ends_with(is_name);
        if starts_a_word && (word.starts_with("vhost_card_") || word.starts_with("process_")) {
            out.insert(word.to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// The metric names in the rules file's expressions (comments and annotations left out).
pub fn rules_names(yaml: &str) -> BTreeSet<String> {
    // An expression is `expr: ...` and the lines indented below it.
    let mut exprs = String::new();
    let mut indent = None;
    for line in yaml.lines() {
        let depth = line.len() - line.trim_start().len();
        let body = line.trim_start();
        if let Some(rest) = body.strip_prefix("expr:") {
            exprs.push_str(rest);
            exprs.push('\n');
            indent = Some(depth);
        } else if indent.is_some_and(|d| depth > d) && !body.is_empty() {
            exprs.push_str(body);
            exprs.push('\n');
        } else if !body.is_empty() {
            indent = None;
        }
    }
    names_in(&exprs)
}

/// The metric names in the dashboard's queries (every `expr` in its JSON).
pub fn dashboard_names(json: &str) -> Result<BTreeSet<String>> {
    let doc: serde_json::Value = serde_json::from_str(json).context("the dashboard's JSON")?;
    let mut exprs = String::new();
    collect_exprs(&doc, &mut exprs);
    Ok(names_in(&exprs))
}

fn collect_exprs(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => {
                        out.push_str(s);
                        out.push('\n');
                    }
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The metric names of the samples in an exposition (text format or OpenMetrics).
pub fn exposed(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect()
}

/// The value of the sample `series` (the name with its labels, exactly as exposed) in a scrape.
pub fn sample(scrape: &str, series: &str) -> Result<f64> {
    let value = scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .with_context(|| format!("no {series} in the scrape"))?;
    value
        .trim()
        .parse()
        .with_context(|| format!("the value of {series}: {value}"))
}

/// Checks that every metric name of the rules and the dashboard is in `scrape` (a real one);
/// returns how many names each uses.
pub fn check_against(scrape: &str) -> Result<(usize, usize)> {
    let have = exposed(scrape);
    let rules = rules_names(&std::fs::read_to_string(rules_file())?);
    let dash = dashboard_names(&std::fs::read_to_string(dashboard_file())?)?;
    ensure!(
        rules.len() >= 3 && dash.len() >= 10,
        "too few metric names found (rules {rules:?}, dashboard {dash:?}): is the parsing broken?"
    );
    for (what, names) in [("vhost-card.rules.yml", &rules), ("vhost-card.json", &dash)] {
        let missing: Vec<&String> = names.iter().filter(|n| !have.contains(*n)).collect();
        ensure!(
            missing.is_empty(),
            "host-config's {what} uses metrics the daemon does not export: {missing:?}\n\
             (exported: {have:?})"
        );
    }
    Ok((rules.len(), dash.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_found_in_expressions_only() {
        let yaml = "# vhost_card_in_a_comment\n- alert: X\n  expr: |\n    rate(vhost_card_a_total[5m])\n      > 0 and process_open_fds\n  annotations:\n    summary: vhost_card_not_this\n- alert: Y\n  expr: vhost_card_b == 0\n";
        let names: Vec<String> = rules_names(yaml).into_iter().collect();
        assert_eq!(
            names,
            ["process_open_fds", "vhost_card_a_total", "vhost_card_b"]
        );
        let json = r#"{"panels":[{"targets":[{"expr":"sum(rate(vhost_card_x_total{a=\"b\"}[1m]))"}],"description":"vhost_card_no"}]}"#;
        let names: Vec<String> = dashboard_names(json).unwrap().into_iter().collect();
        assert_eq!(names, ["vhost_card_x_total"]);
        let scrape = "# HELP vhost_card_m m\nvhost_card_m{q=\"0\"} 1\nprocess_threads 3\n";
        let names: Vec<String> = exposed(scrape).into_iter().collect();
        assert_eq!(names, ["process_threads", "vhost_card_m"]);
        // A name inside a longer word is not a name.
        assert!(names_in("my_vhost_card_x").is_empty());
    }

    #[test]
    fn the_checked_in_files_parse() {
        let rules = rules_names(&std::fs::read_to_string(rules_file()).unwrap());
        assert!(rules.contains("vhost_card_frontend_connected"), "{rules:?}");
        assert!(
            rules.contains("vhost_card_dropped_frames_total"),
            "{rules:?}"
        );
        assert!(
            rules.contains("vhost_card_rx_no_buffers_total"),
            "{rules:?}"
        );
        let dash = dashboard_names(&std::fs::read_to_string(dashboard_file()).unwrap()).unwrap();
        assert!(dash.len() >= 20, "{dash:?}");
    }
}
