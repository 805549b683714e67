//! The Helm chart in `helm/walhook`, checked by Helm itself (Helm v4's library through
//! helm-python-sdk, see tests/tools): it renders for the default values and for realistic
//! value sets, `helm lint --strict` finds no error or warning, every rendered object is valid
//! against Kubernetes' own JSON schemas (the newest and oldest versions kubernetes-validate
//! ships), the rendered walhook.toml is a configuration walhook accepts, secrets reach the
//! pods only through Secret references, and values that cannot work fail with their message.
//!
//! What Helm cannot check stays here as plain file checks: values.yaml mirrors
//! config/default.toml, every values key is documented, the chart follows the crate's
//! version, and every alert has a runbook section in docs/operations.md.

use crate::tools;

use std::collections::BTreeSet;
use std::fs;

use crate::tools::{chart_dir, helm, render, Rendered};
use base64::Engine;
use serde_json::{json, Value};
use yaml_rust2::{Yaml, YamlLoader};

const RELEASE: &str = "crm";
const NAMESPACE: &str = "driftwood";
const FULLNAME: &str = "crm-walhook";

/// The least a working install needs: where the database URL comes from.
fn minimal() -> Value {
    json!({"database": {"existingSecret": "walhook-db"}})
}

/// Value sets an operator would really use, by name.
fn realistic_value_sets() -> Vec<(&'static str, Value)> {
    vec![
        ("defaults (existing secret)", minimal()),
        (
            "secrets created by the chart",
            json!({"secret": {
                "create": true,
                "databaseUrl": "postgres://walhook:pw@db:5432/driftwood?sslmode=require",
                "jwtHs256Secret": "jwt-key-0123456789",
                "encryptionKey": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
            }}),
        ),
        (
            "existing secrets for every key",
            json!({
                "database": {"existingSecret": "db", "urlKey": "url"},
                "jwt": {"existingSecret": "jwt", "secretKey": "key"},
                "encryption": {"existingSecret": "enc", "secretKey": "key"}
            }),
        ),
        (
            "monitoring on (ServiceMonitor, PrometheusRule, dashboard)",
            json!({
                "database": {"existingSecret": "walhook-db"},
                "metrics": {
                    "serviceMonitor": {"enabled": true, "labels": {"release": "prom"}, "interval": "15s", "scrapeTimeout": "10s"},
                    "prometheusRule": {"enabled": true, "labels": {"release": "prom"}}
                },
                "dashboards": {"enabled": true, "annotations": {"grafana_folder": "walhook"}}
            }),
        ),
        (
            "three replicas with resources, extra env, volumes and spreading",
            json!({
                "database": {"existingSecret": "walhook-db"},
                "replicaCount": 3,
                "image": {"digest": "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"},
                "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
                "extraEnv": [{"name": "RUST_LOG", "value": "walhook=debug"}, {"name": "WALHOOK_DISPATCH__MAX_CONCURRENCY", "value": "256"}],
                "extraEnvFrom": [{"secretRef": {"name": "walhook-extra"}}],
                "extraVolumes": [{"name": "db-ca", "secret": {"secretName": "db-ca"}}],
                "extraVolumeMounts": [{"name": "db-ca", "mountPath": "/etc/walhook/certs", "readOnly": true}],
                "podDisruptionBudget": {"maxUnavailable": 1},
                "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                    "weight": 100,
                    "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "walhook"}}}
                }]}},
                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "walhook", "effect": "NoSchedule"}],
                "config": {"database": {"ca_cert": "/etc/walhook/certs/ca.pem", "pool_size": 16}, "log": {"format": "json"}}
            }),
        ),
        (
            "migrations as the CRM tables' owner, granting walhook's role",
            json!({
                "database": {"existingSecret": "walhook-db"},
                "migrate": {"existingSecret": "crm-owner-db", "urlKey": "url"},
                "config": {"database": {"runtime_role": "walhook"}}
            }),
        ),
        (
            "one replica, migrations run by hand, no service account",
            json!({
                "database": {"existingSecret": "walhook-db"},
                "replicaCount": 1,
                "migrate": {"enabled": false},
                "serviceAccount": {"create": false},
                "podSecurityContext": {"runAsUser": null, "runAsGroup": null}
            }),
        ),
    ]
}

fn rendered(values: &Value) -> Rendered {
    render(values, RELEASE, NAMESPACE).unwrap_or_else(|e| panic!("helm template failed: {e}\nvalues: {values}"))
}

/// Kinds that come from the Prometheus Operator's CRDs, not Kubernetes; promtool checks the
/// PrometheusRule's rules (tests/it/alerts.rs).
const CRD_KINDS: &[&str] = &["ServiceMonitor", "PrometheusRule"];

#[test]
fn chart_renders_and_every_object_is_valid_kubernetes() {
    let versions = helm("versions", &json!({}));
    let schemas: Vec<&str> =
        versions["kubernetes_schemas"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let (oldest, newest) = (schemas[0], schemas[schemas.len() - 1]);
    assert!(newest >= "1.34.0", "kubernetes-validate ships schemas up to {newest} only; pin a newer one");
    for (name, values) in realistic_value_sets() {
        let rendered = rendered(&values);
        let objects: Vec<Value> = rendered.objects.iter().map(|(_, o)| o.clone()).collect();
        for k8s in [oldest, newest] {
            let answer = helm("validate", &json!({"version": k8s, "objects": objects}));
            for result in answer["results"].as_array().unwrap() {
                let kind = result["kind"].as_str().unwrap_or("");
                match result["problem"].as_str() {
                    None => {}
                    Some(p) if p.starts_with("no schema") && CRD_KINDS.contains(&kind) => {}
                    Some(p) => panic!("{name}: {kind} {} is not valid Kubernetes {k8s}: {p}", result["name"]),
                }
            }
        }
        for kind in ["ConfigMap", "Deployment", "Service"] {
            assert_eq!(
                rendered.of_kind(kind).iter().filter(|o| o["metadata"]["name"] == FULLNAME).count(),
                1,
                "{name}: {kind}"
            );
        }
        for (_, object) in &rendered.objects {
            let labels = &object["metadata"]["labels"];
            assert_eq!(labels["app.kubernetes.io/instance"], RELEASE, "{name}: {object}");
        }
    }
}

#[test]
fn value_sets_render_what_they_ask_for() {
    let sets: std::collections::BTreeMap<_, _> = realistic_value_sets().into_iter().collect();
    let defaults = rendered(&sets["defaults (existing secret)"]);
    assert!(defaults.of_kind("ServiceMonitor").is_empty() && defaults.of_kind("PrometheusRule").is_empty());
    assert!(
        defaults.of_kind("ConfigMap").iter().all(|c| c["metadata"]["labels"].get("grafana_dashboard").is_none()),
        "the dashboard is off by default"
    );
    assert_eq!(
        defaults.get("Job", "crm-walhook-migrate")["metadata"]["annotations"]["helm.sh/hook"],
        "pre-install,pre-upgrade"
    );
    assert_eq!(defaults.get("PodDisruptionBudget", FULLNAME)["spec"]["minAvailable"], 1);
    assert_eq!(defaults.get("Deployment", FULLNAME)["spec"]["replicas"], 2);

    let monitoring = rendered(&sets["monitoring on (ServiceMonitor, PrometheusRule, dashboard)"]);
    let monitor = monitoring.get("ServiceMonitor", FULLNAME);
    assert_eq!(monitor["metadata"]["labels"]["release"], "prom");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["interval"], "15s");
    assert_eq!(monitoring.get("PrometheusRule", FULLNAME)["metadata"]["labels"]["release"], "prom");
    let notes = monitoring.manifests["walhook/templates/NOTES.txt"].as_str().unwrap();
    assert!(notes.contains("ConfigMap crm-walhook-dashboard in namespace driftwood"), "{notes}");
    let dashboard = monitoring.get("ConfigMap", "crm-walhook-dashboard");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(dashboard["metadata"]["annotations"]["grafana_folder"], "walhook");
    let shipped: Value = serde_json::from_str(dashboard["data"]["walhook.json"].as_str().unwrap()).unwrap();
    let file: Value = serde_json::from_str(&read(&chart_dir().join("dashboards/walhook.json"))).unwrap();
    assert_eq!(shipped, file, "the ConfigMap ships dashboards/walhook.json as it is");

    let scaled = rendered(&sets["three replicas with resources, extra env, volumes and spreading"]);
    let deployment = scaled.get("Deployment", FULLNAME);
    assert_eq!(deployment["spec"]["replicas"], 3);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert!(container["image"]
        .as_str()
        .unwrap()
        .ends_with("@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"));
    assert_eq!(container["resources"]["limits"]["memory"], "512Mi");
    let env_names: Vec<&str> =
        container["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert!(
        env_names.contains(&"RUST_LOG") && env_names.contains(&"WALHOOK_DISPATCH__MAX_CONCURRENCY"),
        "{env_names:?}"
    );
    assert_eq!(container["envFrom"][0]["secretRef"]["name"], "walhook-extra");
    assert!(container["volumeMounts"].as_array().unwrap().iter().any(|m| m["mountPath"] == "/etc/walhook/certs"));
    assert!(pod["volumes"].as_array().unwrap().iter().any(|v| v["name"] == "db-ca"));
    assert_eq!(pod["tolerations"][0]["key"], "dedicated");
    assert!(pod["affinity"]["podAntiAffinity"].is_object());
    assert_eq!(scaled.get("PodDisruptionBudget", FULLNAME)["spec"]["maxUnavailable"], 1);
    let toml = walhook_toml(&scaled, FULLNAME);
    assert_eq!(toml["database"]["ca_cert"].as_str(), Some("/etc/walhook/certs/ca.pem"));
    assert_eq!(toml["database"]["pool_size"].as_integer(), Some(16));
    // The migrate Job gets the same extra env, volumes and walhook.toml.
    let job = &scaled.get("Job", "crm-walhook-migrate")["spec"]["template"]["spec"];
    assert!(job["containers"][0]["env"].as_array().unwrap().iter().any(|e| e["name"] == "RUST_LOG"));
    assert!(job["volumes"].as_array().unwrap().iter().any(|v| v["name"] == "db-ca"));
    assert_eq!(walhook_toml(&scaled, "crm-walhook-migrate"), toml);

    let owner = rendered(&sets["migrations as the CRM tables' owner, granting walhook's role"]);
    let url_ref = |kind: &str, name: &str| {
        let env = &owner.get(kind, name)["spec"]["template"]["spec"]["containers"][0]["env"];
        let url = env.as_array().unwrap().iter().find(|e| e["name"] == "WALHOOK_DATABASE__URL").unwrap();
        url["valueFrom"]["secretKeyRef"].clone()
    };
    assert_eq!(url_ref("Job", "crm-walhook-migrate"), json!({"name": "crm-owner-db", "key": "url"}));
    assert_eq!(url_ref("Deployment", FULLNAME), json!({"name": "walhook-db", "key": "database-url"}));
    let mut file = walhook_toml(&owner, "crm-walhook-migrate");
    assert_eq!(file["database"]["runtime_role"].as_str(), Some("walhook"));
    file["database"].as_table_mut().unwrap().insert("url".into(), "postgres://crm_owner@db/driftwood".into());
    let cfg = walhook::config::Config::from_toml(&toml::to_string(&file).unwrap()).expect("walhook loads it");
    assert_eq!(cfg.database.runtime_role.map(|r| r.to_string()), Some("walhook".into()));

    let single = rendered(&sets["one replica, migrations run by hand, no service account"]);
    assert!(single.of_kind("PodDisruptionBudget").is_empty(), "one replica: no PDB (it would block drains)");
    assert!(single.of_kind("Job").is_empty() && single.of_kind("ServiceAccount").is_empty());
    let pod = &single.get("Deployment", FULLNAME)["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "default");
    assert!(pod["securityContext"].get("runAsUser").is_none(), "null leaves the user to the platform");
    assert!(single.manifests["walhook/templates/NOTES.txt"].as_str().unwrap().contains("migrate.enabled=false"));
}

#[test]
fn lint_finds_no_error_or_warning() {
    for (name, values) in realistic_value_sets() {
        let report = helm("lint", &json!({"chart": chart_dir(), "values": values}));
        let serious: Vec<&Value> = report["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["severity"].as_i64().unwrap_or(3) >= 2)
            .collect();
        assert!(serious.is_empty(), "{name}: helm lint --strict: {serious:?}");
        assert!(
            report["errors"].as_array().is_none_or(|e| e.is_empty()),
            "{name}: helm lint --strict: {}",
            report["errors"]
        );
    }
}

#[test]
fn values_that_cannot_work_fail_with_their_message() {
    let cases = [
        (json!({}), "the PostgreSQL URL must come from a Secret: set database.existingSecret"),
        (
            json!({"secret": {"create": true}}),
            "secret.databaseUrl is required when secret.create is true and database.existingSecret is empty",
        ),
        (
            json!({"database": {"existingSecret": "db"}, "config": {"auth": {"static_tokens": [{"account_id": "a", "user_id": "u"}]}}}),
            "config.auth.static_tokens[].token_sha256 is required",
        ),
    ];
    for (values, message) in cases {
        match render(&values, RELEASE, NAMESPACE) {
            Ok(_) => panic!("values {values} rendered; they should fail with {message:?}"),
            Err(e) => assert!(e.contains(message), "values {values} failed with {e:?}, not {message:?}"),
        }
    }
}

/// The walhook.toml of the ConfigMap `name`, parsed.
fn walhook_toml(rendered: &Rendered, name: &str) -> toml::Table {
    let text = rendered.get("ConfigMap", name)["data"]["walhook.toml"].as_str().expect("walhook.toml").to_string();
    text.parse().unwrap_or_else(|e| panic!("ConfigMap {name} holds invalid TOML: {e}\n{text}"))
}

#[test]
fn rendered_config_is_walhook_defaults_and_loads() {
    let defaults = rendered(&minimal());
    let toml = walhook_toml(&defaults, FULLNAME);
    // default.toml lists every key walhook knows; the chart renders all but the secrets.
    let mut expected: toml::Table = walhook::config::DEFAULT_TOML.parse().unwrap();
    expected.remove("secrets");
    assert_eq!(toml, expected, "the chart's walhook.toml should be walhook's defaults (secrets aside)");
    assert_eq!(walhook_toml(&defaults, "crm-walhook-migrate"), toml, "the migrate hook gets the same file");

    // Non-default values flow through Helm into a file walhook accepts, with the URL from env.
    let values = json!({
        "database": {"existingSecret": "db"},
        "config": {
            "dispatch": {"request_timeout": "20s", "retry_schedule": ["1s", "1m"], "jitter": 0.1, "allowed_cidrs": ["10.0.0.0/8"]},
            "api": {"rate_limit_per_second": 50},
            "replication": {"replica_identity_full": false},
            "auth": {"static_tokens": [{
                "token_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                "account_id": "aaaa0000-0000-4000-8000-000000000001",
                "user_id": "cccc0000-0000-4000-8000-000000000003"
            }]}
        }
    });
    let mut file = walhook_toml(&rendered(&values), FULLNAME);
    file["database"].as_table_mut().unwrap().insert("url".into(), "postgres://walhook:pw@db:5432/driftwood".into());
    let text = toml::to_string(&file).unwrap();
    let cfg = walhook::config::Config::from_toml(&text)
        .unwrap_or_else(|e| panic!("walhook rejects the rendered file: {e}\n{text}"));
    assert_eq!(cfg.dispatch.request_timeout.0, std::time::Duration::from_secs(20));
    assert_eq!(cfg.dispatch.retry_schedule.len(), 2);
    assert_eq!(cfg.auth.static_tokens.len(), 1);
    assert!(!cfg.replication.replica_identity_full, "a false boolean stays false through Helm");
}

#[test]
fn secrets_reach_the_pods_only_as_secret_references() {
    let (url, jwt, key) = (
        "postgres://walhook:s3cret-pw@db/driftwood",
        "jwt-0123456789-secret",
        "ZW5jcnlwdGlvbi1rZXktMzItYnl0ZXMtbG9uZy0xMjM=",
    );
    let values = json!({"secret": {"create": true, "databaseUrl": url, "jwtHs256Secret": jwt, "encryptionKey": key}});
    let rendered = rendered(&values);
    for (template, object) in &rendered.objects {
        if object["kind"] == "Secret" {
            continue;
        }
        let text = object.to_string();
        for secret in [url, jwt, key, "s3cret-pw"] {
            assert!(!text.contains(secret), "{template} holds a secret value in plain text");
        }
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    for secret_name in [FULLNAME, "crm-walhook-migrate"] {
        let data = &rendered.get("Secret", secret_name)["data"];
        let decode = |k: &str| String::from_utf8(b64.decode(data[k].as_str().unwrap()).unwrap()).unwrap();
        assert_eq!(
            (decode("database-url"), decode("jwt-hs256-secret"), decode("encryption-key")),
            (url.into(), jwt.into(), key.into())
        );
    }
    for (workload, kind, secret_name) in
        [(FULLNAME, "Deployment", FULLNAME), ("crm-walhook-migrate", "Job", "crm-walhook-migrate")]
    {
        let env = &rendered.get(kind, workload)["spec"]["template"]["spec"]["containers"][0]["env"];
        for (var, key) in [
            ("WALHOOK_DATABASE__URL", "database-url"),
            ("WALHOOK_AUTH__JWT_HS256_SECRET", "jwt-hs256-secret"),
            ("WALHOOK_SECRETS__ENCRYPTION_KEY", "encryption-key"),
        ] {
            let entry = env
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == var)
                .unwrap_or_else(|| panic!("{kind} lacks {var}"));
            assert_eq!(entry["valueFrom"]["secretKeyRef"], json!({"name": secret_name, "key": key}), "{kind} {var}");
        }
    }
}

#[test]
fn pods_keep_their_probes_hardening_and_grace() {
    let rendered = rendered(&minimal());
    let pod = &rendered.get("Deployment", FULLNAME)["spec"]["template"];
    let spec = &pod["spec"];
    let container = &spec["containers"][0];
    assert_eq!(container["args"], json!(["run", "--config", "/etc/walhook/walhook.toml"]));
    assert_eq!(container["livenessProbe"]["httpGet"], json!({"path": "/healthz", "port": "metrics"}));
    assert_eq!(container["readinessProbe"]["httpGet"], json!({"path": "/readyz", "port": "metrics"}));
    let ports: Vec<(&str, i64)> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["containerPort"].as_i64().unwrap()))
        .collect();
    assert_eq!(ports, [("http", 8080), ("metrics", 9090)], "ports follow config.api.listen / config.metrics.listen");
    let security = &container["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(spec["securityContext"]["runAsUser"], 10001);
    assert!(pod["metadata"]["annotations"]["checksum/config"].as_str().is_some_and(|c| c.len() == 64));
    // Kubernetes must wait longer than walhook's own grace before killing it.
    let grace = walhook_toml(&rendered, FULLNAME)["shutdown"]["grace"].as_str().unwrap().to_string();
    let grace = humantime::parse_duration(&grace).unwrap().as_secs() as i64;
    assert!(spec["terminationGracePeriodSeconds"].as_i64().unwrap() > grace);
    assert!(container["volumeMounts"].as_array().unwrap().iter().any(|m| m["mountPath"] == "/etc/walhook"));
    let job = &rendered.get("Job", "crm-walhook-migrate")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(job["args"], json!(["migrate", "--config", "/etc/walhook/walhook.toml"]));
    let service = rendered.get("Service", FULLNAME);
    let names: Vec<&str> =
        service["spec"]["ports"].as_array().unwrap().iter().map(|p| p["targetPort"].as_str().unwrap()).collect();
    assert_eq!(names, ["http", "metrics"]);
}

#[test]
fn notes_and_readme_guide_the_operator() {
    let rendered = rendered(&minimal());
    let notes = rendered.manifests["walhook/templates/NOTES.txt"].as_str().unwrap();
    for needle in ["/readyz", "/metrics", "migrate", "Secret", "crm-walhook"] {
        assert!(notes.contains(needle), "NOTES.txt should mention {needle}:\n{notes}");
    }
    let readme = read(&chart_dir().join("README.md"));
    for needle in ["helm install", "existingSecret", "Upgrading"] {
        assert!(readme.contains(needle), "helm/walhook/README.md should mention {needle}");
    }
}

// ---- What Helm cannot check -------------------------------------------------------------

fn read(path: &std::path::Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn values_yaml() -> Yaml {
    let mut docs = YamlLoader::load_from_str(&read(&chart_dir().join("values.yaml"))).expect("values.yaml parses");
    docs.remove(0)
}

#[test]
fn every_values_key_is_commented() {
    let text = read(&chart_dir().join("values.yaml"));
    let lines: Vec<&str> = text.lines().collect();
    let defines_key = |line: &str| {
        let mut rest = line.trim_start();
        if let Some(item) = rest.strip_prefix("- ") {
            rest = item.trim_start();
        }
        let key_len = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
        key_len > 0 && rest[key_len..].starts_with(':')
    };
    let mut undocumented = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with('#') || !defines_key(line) {
            continue;
        }
        let previous = lines[..n].iter().rev().find(|l| !l.trim().is_empty());
        if !(line.contains(" #") || previous.is_some_and(|l| l.trim_start().starts_with('#'))) {
            undocumented.push(format!("values.yaml:{}: {}", n + 1, line.trim()));
        }
    }
    assert!(undocumented.is_empty(), "values keys without a comment above them:\n{}", undocumented.join("\n"));
}

#[test]
fn chart_metadata_matches_the_crate() {
    let text = read(&chart_dir().join("Chart.yaml"));
    let meta = &YamlLoader::load_from_str(&text).unwrap()[0];
    assert_eq!(
        meta["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "Chart.yaml appVersion (a quoted string) must equal the crate version"
    );
}

/// YAML scalar/sequence/mapping as the TOML value walhook would read.
fn yaml_to_toml(yaml: &Yaml) -> toml::Value {
    match yaml {
        Yaml::String(s) => toml::Value::String(s.clone()),
        Yaml::Integer(i) => toml::Value::Integer(*i),
        Yaml::Real(r) => toml::Value::Float(r.parse().expect("real")),
        Yaml::Boolean(b) => toml::Value::Boolean(*b),
        Yaml::Array(items) => toml::Value::Array(items.iter().map(yaml_to_toml).collect()),
        Yaml::Hash(hash) => toml::Value::Table(
            hash.iter().map(|(k, v)| (k.as_str().expect("string key").to_string(), yaml_to_toml(v))).collect(),
        ),
        other => panic!("values.yaml config holds a value walhook cannot read: {other:?}"),
    }
}

/// Optional non-secret keys absent from default.toml.
const OPTIONAL_KEYS: &[(&str, &str)] =
    &[("database", "ca_cert"), ("database", "runtime_role"), ("auth", "jwt_audience"), ("auth", "jwt_issuer")];

#[test]
fn values_config_mirrors_walhook_defaults() {
    let config = yaml_to_toml(&values_yaml()["config"]);
    let config = config.as_table().expect("config is a mapping");
    let defaults: toml::Table = walhook::config::DEFAULT_TOML.parse().expect("default.toml parses");
    let mut differences = BTreeSet::new();
    for (section, table) in config {
        let table = table.as_table().unwrap_or_else(|| panic!("config.{section} should be a mapping"));
        for (key, value) in table {
            match defaults.get(section).and_then(|s| s.get(key)) {
                Some(default) if default != value => {
                    differences.insert(format!("config.{section}.{key}: chart {value}, walhook {default}"));
                }
                Some(_) => {}
                None if OPTIONAL_KEYS.contains(&(section.as_str(), key.as_str())) => {}
                None => {
                    differences.insert(format!("config.{section}.{key} is not a walhook key"));
                }
            }
        }
    }
    for (section, table) in &defaults {
        for key in table.as_table().unwrap().keys() {
            if config.get(section).and_then(|s| s.get(key)).is_none() {
                differences.insert(format!("config.{section}.{key} is missing from values.yaml"));
            }
        }
    }
    assert!(
        differences.is_empty(),
        "values.yaml config differs from walhook's defaults:\n{}",
        differences.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn every_alert_has_a_runbook_section_in_the_operations_guide() {
    let rules = tools::rendered_rules("");
    let guide = read(&chart_dir().join("../../docs/operations.md"));
    let alerts = tools::alerts(&rules);
    assert!(alerts.len() >= 4, "alerts found: {alerts:?}");
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let Some(alert) = rule["alert"].as_str() else { continue };
            assert!(
                guide.contains(&format!("### {alert}\n")),
                "docs/operations.md lacks a `### {alert}` runbook section"
            );
            let url = rule["annotations"]["runbook_url"].as_str().unwrap_or_default();
            assert!(
                url.ends_with(&format!("docs/operations.md#{}", alert.to_lowercase())),
                "{alert}'s runbook_url points elsewhere: {url}"
            );
        }
    }
}
