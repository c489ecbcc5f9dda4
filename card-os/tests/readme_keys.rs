//! card-os/README.md documents every key of the card's file: its tables list exactly the keys
//! the config structs take (read from serde's own "expected one of" list, so the structs, not
//! a copy, are the reference) and, for `[daemon]`, the daemon's long flags.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use clap::CommandFactory;

/// Documented keys by table: the rows "| `key` |" under each "### `[table]`" heading.
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut table = None;
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("### `") {
            table = Some(
                h.trim_end_matches('`')
                    .trim_matches(|c| c == '[' || c == ']')
                    .to_string(),
            );
        } else if line.starts_with("## ") {
            table = None;
        } else if let (Some(t), Some(rest)) = (&table, line.strip_prefix("| `")) {
            let key = rest.split('`').next().unwrap_or_default().to_string();
            out.entry(t.clone()).or_default().insert(key);
        }
    }
    out
}

fn example() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("card.toml")).unwrap()
}

/// The keys serde takes in `table`: an unknown key there makes it list them.
fn struct_keys(table: &str) -> BTreeSet<String> {
    let text = example();
    let header = if table == "port" {
        "[[port]]"
    } else {
        &format!("[{table}]")
    };
    assert!(text.contains(header), "the example has no {header}");
    let edited = text.replacen(header, &format!("{header}\nzz_unknown = 1"), 1);
    let err = card_os::Config::parse(&edited, Path::new("/etc/vhost-card/card.toml"))
        .unwrap_err()
        .to_string();
    // "expected `a`", "expected `a` or `b`", "expected one of `a`, `b`, `c`".
    let list = err
        .split("expected ")
        .nth(1)
        .unwrap_or_else(|| panic!("no field list in {err}"));
    let list = list.lines().next().unwrap_or_default();
    list.trim_start_matches("one of ")
        .replace(" or ", ", ")
        .split(", ")
        .map(|k| k.trim().trim_matches('`').to_string())
        .filter(|k| !k.is_empty())
        .collect()
}

#[test]
fn every_table_documents_exactly_its_keys() {
    let doc = documented();
    for table in ["card", "link", "port", "firewall", "ipsec", "services"] {
        let keys = struct_keys(table);
        let documented = doc.get(table).cloned().unwrap_or_default();
        assert_eq!(
            documented, keys,
            "README's [{table}] table (left) against the struct's keys (right)"
        );
    }
    // The file's tables themselves.
    let tables: BTreeSet<String> = doc.keys().cloned().collect();
    let expected: BTreeSet<String> = [
        "daemon", "card", "link", "port", "firewall", "ipsec", "services",
    ]
    .map(String::from)
    .into();
    assert_eq!(tables, expected);
}

#[test]
fn daemon_table_documents_the_daemon_flags() {
    let doc = documented();
    let flags: BTreeSet<String> = vhost_card::config::Args::command()
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| {
            !matches!(
                *l,
                "config" | "print-capabilities" | "fd" | "help" | "version"
            )
        })
        .map(String::from)
        .collect();
    assert_eq!(
        doc["daemon"], flags,
        "README's [daemon] table (left) against vhost-card's flags"
    );
}
