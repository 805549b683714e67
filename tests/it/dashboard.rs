//! The Grafana dashboard (helm/walhook/dashboards/walhook.json) and the alerts against a real
//! Prometheus (Debian's `prometheus`) scraping a real walhook under a small load: every panel
//! query parses and returns data, and every alert expression parses, evaluates and refers only
//! to series walhook really exports.
//!
//! The load covers what the panels show: deliveries that succeed, fail (500, retried until
//! they give up, so the outbox fills) and hit a 410 (the endpoint is disabled).

use crate::tools;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{free_port, wait_for, Env, ACCOUNT_A};
use serde_json::Value;
use walhook::local::receiver::Reply;

/// Labels the test's scrape gives walhook, as a Kubernetes ServiceMonitor would.
const NAMESPACE: &str = "walhook-test";
const JOB: &str = "walhook";

/// A Prometheus server of the test's own; killed when dropped.
struct Prometheus {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second.
    async fn start(target: &str) -> Prometheus {
        let binary = tools::prometheus_tool("prometheus");
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{target}']\n\
             \x20       labels: {{namespace: {NAMESPACE}}}\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus { child, base: format!("http://127.0.0.1:{port}"), _dir: dir };
        let ready = format!("{}/-/ready", prometheus.base);
        wait_for(Duration::from_secs(30), || {
            let ready = ready.clone();
            async move { reqwest::get(ready).await.is_ok_and(|r| r.status().is_success()) }
        })
        .await;
        // Scraping starts a few seconds after readiness (service discovery settles first).
        wait_for(Duration::from_secs(30), || async {
            prometheus.series(&format!("up{{job=\"{JOB}\"}} == 1")).await > 0
        })
        .await;
        prometheus
    }

    /// The JSON answer of an instant query.
    async fn query(&self, expr: &str) -> Value {
        let url = url::Url::parse_with_params(&format!("{}/api/v1/query", self.base), &[("query", expr)]).unwrap();
        let text = reqwest::get(url).await.unwrap().text().await.unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{expr}: Prometheus answered no JSON ({e}): {text}"))
    }

    /// How many series `expr` returns now (panics when it does not parse or evaluate).
    async fn series(&self, expr: &str) -> usize {
        let answer = self.query(expr).await;
        assert_eq!(answer["status"], "success", "{expr}: {answer}");
        answer["data"]["result"].as_array().map_or(0, Vec::len)
    }
}

/// (panel title, expression) of every target of the dashboard, with Grafana's variables
/// replaced the way Grafana would for this test's walhook.
fn panel_queries() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/walhook/dashboards/walhook.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("dashboard JSON");
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("panel title").to_string();
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("panel {title} has no targets"));
        assert!(!targets.is_empty(), "panel {title} has no targets");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {title} should use the datasource variable");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_else(|| panic!("panel {title}: a target without expr"));
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$namespace", NAMESPACE)
                .replace("$job", JOB)
                .replace("$__range", "1h");
            assert!(!expr.contains('$'), "panel {title}: a variable the test does not know in {expr}");
            out.push((title.clone(), expr));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_and_alert_query_works_against_a_real_walhook() {
    let env = Env::new("dash_queries").await;
    env.endpoint(ACCOUNT_A, "ok", &["contact.created"]).await;
    env.endpoint(ACCOUNT_A, "fails", &["contact.created"]).await;
    env.receiver.set_default("/fails", Reply::Status(500));
    env.endpoint(ACCOUNT_A, "gone", &["contact.created"]).await;
    env.receiver.set_default("/gone", Reply::Status(410));
    let walhook = env.start("").await;
    let prometheus = Prometheus::start(&format!("127.0.0.1:{}", env.metrics_port)).await;

    // A small load: 60 contacts in 20 transactions over about 6 seconds.
    for batch in 0..20 {
        env.sql(&format!(
            "INSERT INTO contacts (account_id, first_name) SELECT '{ACCOUNT_A}', 'load-{batch}-' || g FROM generate_series(1, 3) g"
        ))
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Prometheus has seen what the panels show: deliveries, failures, a disable, the outbox.
    for expr in [
        "walhook_dispatch_attempts_total{outcome=\"2xx\"} >= 30",
        "walhook_dispatch_attempts_total{outcome=\"5xx\"}",
        "walhook_endpoints_disabled_total{reason=\"gone\"}",
        "walhook_endpoints{state=\"disabled\"} == 1",
        "rate(walhook_dispatch_commit_to_delivered_seconds_count[1m]) > 0",
    ] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while prometheus.series(expr).await == 0 {
            assert!(tokio::time::Instant::now() < deadline, "Prometheus never saw {expr}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let mut empty = Vec::new();
    let queries = panel_queries();
    assert!(queries.len() >= 10, "the dashboard has too few queries: {}", queries.len());
    for (title, expr) in &queries {
        if prometheus.series(expr).await == 0 {
            empty.push(format!("{title}: {expr}"));
        }
    }
    assert!(empty.is_empty(), "panel queries that return no data:\n{}", empty.join("\n"));

    // The alerts, selecting this test's walhook: each expression evaluates, and each metric it
    // uses is one walhook exports. Walhook streams, so WalhookReplicationDown stays silent.
    let rules = tools::rendered_rules(&format!("namespace=\"{NAMESPACE}\",job=\"{JOB}\""));
    let alerts = tools::alerts(&rules);
    assert!(alerts.len() >= 4, "{alerts:?}");
    for (alert, expr) in &alerts {
        let firing = prometheus.series(expr).await;
        if alert == "WalhookReplicationDown" {
            assert_eq!(firing, 0, "{alert} fires against a streaming walhook: {expr}");
        }
        for metric in metric_names(expr) {
            assert!(
                prometheus.series(&format!("{metric}{{job=\"{JOB}\"}}")).await > 0,
                "{alert} uses {metric}, which walhook does not export"
            );
        }
    }
    walhook.stop().await.unwrap();
}

/// The `walhook_…` metric names an expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("walhook_") {
        let len = rest[at..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len() - at);
        names.push(rest[at..at + len].to_string());
        rest = &rest[at + len..];
    }
    names.sort();
    names.dedup();
    names
}
