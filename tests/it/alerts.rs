//! The chart's alerts, proven with Prometheus' own tools: the PrometheusRule Helm renders is
//! extracted as a rules file, `promtool check rules` accepts it, and `promtool test rules`
//! runs tests/alerts.test.yaml, which shows each alert firing on the series that should page
//! and silent on healthy ones.
//!
//! What must hold: every alert the chart renders has at least one firing and one silent case
//! in tests/alerts.test.yaml (adding an alert means adding both there), and the test file
//! names no alert the chart lacks.

use crate::tools;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use yaml_rust2::YamlLoader;

/// The test file's cases per alert: (alerts with a firing case, alerts with a silent case).
fn cases(test_file: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let doc = &YamlLoader::load_from_str(test_file).expect("alerts.test.yaml parses")[0];
    let (mut firing, mut silent) = (BTreeSet::new(), BTreeSet::new());
    for group in doc["tests"].as_vec().expect("tests") {
        for case in group["alert_rule_test"].as_vec().into_iter().flatten() {
            let alert = case["alertname"].as_str().expect("alertname").to_string();
            if case["exp_alerts"].as_vec().is_some_and(|a| !a.is_empty()) {
                firing.insert(alert);
            } else {
                silent.insert(alert);
            }
        }
    }
    (firing, silent)
}

/// Writes the rendered rules and the test file into `dir`; returns the rules' alert names.
fn prepare(dir: &Path) -> BTreeSet<String> {
    let rules = tools::rendered_rules("");
    // A JSON document is YAML, which is what Prometheus reads rule files as.
    std::fs::write(dir.join("rules.yaml"), serde_json::to_string_pretty(&rules).unwrap()).unwrap();
    let test_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("alerts.test.yaml");
    std::fs::copy(&test_file, dir.join("alerts.test.yaml")).unwrap();
    tools::alerts(&rules).into_iter().map(|(name, _)| name).collect()
}

#[test]
fn promtool_accepts_the_rendered_rules() {
    let promtool = tools::prometheus_tool("promtool");
    let dir = tempfile::tempdir().unwrap();
    let alerts = prepare(dir.path());
    assert!(alerts.len() >= 4, "the chart renders too few alerts: {alerts:?}");
    let (ok, out) = tools::run(Command::new(&promtool).args(["check", "rules"]).arg(dir.path().join("rules.yaml")));
    assert!(ok, "promtool check rules:\n{out}");
    assert!(out.contains(&format!("SUCCESS: {} rules found", alerts.len())), "promtool check rules:\n{out}");
}

#[test]
fn every_alert_fires_on_what_should_page_and_stays_silent_on_healthy_series() {
    let promtool = tools::prometheus_tool("promtool");
    let dir = tempfile::tempdir().unwrap();
    let alerts = prepare(dir.path());
    let (firing, silent) = cases(&std::fs::read_to_string(dir.path().join("alerts.test.yaml")).unwrap());
    let untested: Vec<&String> = alerts.iter().filter(|a| !firing.contains(*a) || !silent.contains(*a)).collect();
    assert!(
        untested.is_empty(),
        "tests/alerts.test.yaml needs a firing and a silent case for each alert; missing for {untested:?}"
    );
    let unknown: Vec<&String> = firing.union(&silent).filter(|a| !alerts.contains(*a)).collect();
    assert!(unknown.is_empty(), "tests/alerts.test.yaml tests alerts the chart does not render: {unknown:?}");

    let (ok, out) =
        tools::run(Command::new(&promtool).args(["test", "rules"]).arg(dir.path().join("alerts.test.yaml")));
    assert!(ok, "promtool test rules tests/alerts.test.yaml:\n{out}");
}
