//! The operations tools the chart, alert and dashboard tests call: real Helm (helm-python-sdk,
//! Helm v4's library) and Kubernetes' schemas (kubernetes-validate) in a Python virtualenv,
//! and Debian's `promtool` and `prometheus`. `.ci/install-tools` installs all of them.
//!
//! What must hold: a missing tool fails the test with the command that installs it; nothing
//! here skips, so a machine without the tools can never pass these tests by accident.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

/// The virtualenv holding helm-python-sdk and kubernetes-validate: `$OPS_TOOLS_VENV`, else
/// the place `.ci/install-tools` puts it.
pub fn venv() -> PathBuf {
    std::env::var_os("OPS_TOOLS_VENV").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/opt/walhook-ops-tools"))
}

const INSTALL_VENV: &str = "python3 -m venv /opt/walhook-ops-tools && \
     /opt/walhook-ops-tools/bin/pip install -r .ci/ops-tools.txt (or run .ci/install-tools; \
     set OPS_TOOLS_VENV to use another virtualenv)";

/// The virtualenv's python, checked to import both packages.
fn python() -> PathBuf {
    let python = venv().join("bin").join("python");
    let probe = Command::new(&python).args(["-c", "import helm_python, kubernetes_validate"]).output();
    match probe {
        Ok(out) if out.status.success() => python,
        Ok(out) => panic!(
            "{} cannot import helm_python/kubernetes_validate ({}); install them: {INSTALL_VENV}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!("no Python virtualenv with Helm at {} ({e}); install it: {INSTALL_VENV}", python.display()),
    }
}

/// The virtualenv's `schemathesis` (the OpenAPI contract fuzzer), checked to run.
pub fn schemathesis() -> PathBuf {
    let bin = venv().join("bin").join("schemathesis");
    match Command::new(&bin).arg("--version").output() {
        Ok(out) if out.status.success() => bin,
        _ => panic!("no schemathesis at {}; install it: {INSTALL_VENV}", bin.display()),
    }
}

/// A binary of Debian's prometheus package, found on PATH.
pub fn prometheus_tool(name: &str) -> PathBuf {
    match Command::new(name).arg("--version").output() {
        Ok(out) if out.status.success() => PathBuf::from(name),
        _ => panic!("{name} is not installed: apt-get install prometheus (or run .ci/install-tools)"),
    }
}

pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("helm").join("walhook")
}

/// Runs one command of tests/it/tools/helm.py with `request` on stdin; returns its JSON answer.
pub fn helm(command: &str, request: &Value) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("it").join("tools").join("helm.py");
    let mut child = Command::new(python())
        .arg(&script)
        .arg(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the Helm driver");
    child.stdin.take().unwrap().write_all(request.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "helm.py {command} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("helm.py {command} answered no JSON: {e}"))
}

/// The chart rendered by Helm for one release.
pub struct Rendered {
    /// Template path → rendered text (NOTES.txt included).
    pub manifests: serde_json::Map<String, Value>,
    /// Every YAML document, parsed, as (template path, object).
    pub objects: Vec<(String, Value)>,
}

impl Rendered {
    /// Objects of one kind.
    pub fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|(_, o)| o["kind"] == kind).map(|(_, o)| o).collect()
    }

    /// The single object of `kind` named `name`.
    pub fn get(&self, kind: &str, name: &str) -> &Value {
        let found: Vec<&Value> = self.of_kind(kind).into_iter().filter(|o| o["metadata"]["name"] == name).collect();
        assert_eq!(found.len(), 1, "expected one {kind} {name}, found {}", found.len());
        found[0]
    }
}

/// Renders the chart with `values` as release `release` in `namespace`; `Err` is Helm's message.
pub fn render(values: &Value, release: &str, namespace: &str) -> Result<Rendered, String> {
    let chart = chart_dir();
    let answer = helm("render", &json!({"chart": chart, "values": values, "release": release, "namespace": namespace}));
    if answer["ok"] != true {
        return Err(answer["error"].as_str().unwrap_or("no message").to_string());
    }
    let manifests = answer["manifests"].as_object().expect("manifests").clone();
    let objects = answer["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .map(|o| (o["template"].as_str().unwrap().to_string(), o["object"].clone()))
        .collect();
    Ok(Rendered { manifests, objects })
}

/// The rules file (`{groups: …}`) of the chart's PrometheusRule, rendered with the rule on.
/// The series selector is `selector` (the chart's default when empty).
pub fn rendered_rules(selector: &str) -> Value {
    let values = json!({
        "database": {"existingSecret": "walhook-db"},
        "metrics": {"prometheusRule": {"enabled": true, "selector": selector}},
    });
    let rendered = render(&values, "walhook", "monitoring").unwrap_or_else(|e| panic!("render: {e}"));
    let rule = rendered.get("PrometheusRule", "walhook");
    json!({"groups": rule["spec"]["groups"].clone()})
}

/// (alert name, expression) of every alerting rule in a rules file.
pub fn alerts(rules: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            if let Some(alert) = rule["alert"].as_str() {
                out.push((alert.to_string(), rule["expr"].as_str().expect("expr").to_string()));
            }
        }
    }
    out
}

/// Runs a command; returns (success, stdout + stderr).
pub fn run(command: &mut Command) -> (bool, String) {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}
