//! Static checks of the Helm chart in `helm/walhook` (Helm itself is not available to the tests,
//! so nothing is rendered): the plain YAML files parse, every `.Values.…` path the templates use
//! exists in values.yaml, every values key is documented, the chart's appVersion follows the
//! crate, the templates keep the probes, hardening and secret handling walhook relies on, and the
//! `config` block and the TOML template agree with the configuration walhook accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("helm").join("walhook")
}

/// Every file below `dir`, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = fs::read_dir(&d).unwrap_or_else(|e| panic!("cannot list {}: {e}", d.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Parses a file holding exactly one YAML document.
fn load_yaml(path: &Path) -> Yaml {
    let mut docs =
        YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
    assert_eq!(docs.len(), 1, "{} should hold exactly one YAML document", path.display());
    docs.remove(0)
}

fn values() -> Yaml {
    load_yaml(&chart_dir().join("values.yaml"))
}

/// (file name, text) of every file under templates/.
fn templates() -> Vec<(String, String)> {
    let dir = chart_dir().join("templates");
    let files = files_under(&dir);
    assert!(!files.is_empty(), "no templates in {}", dir.display());
    files.iter().map(|p| (p.strip_prefix(&dir).expect("below templates/").display().to_string(), read(p))).collect()
}

fn all_templates() -> String {
    templates().into_iter().map(|(_, text)| text).collect::<Vec<_>>().join("\n")
}

fn template(name: &str) -> String {
    read(&chart_dir().join("templates").join(name))
}

/// The body of `{{ define "name" }}` in _helpers.tpl.
fn helper_body(name: &str) -> String {
    let helpers = template("_helpers.tpl");
    let start_tag = format!("define \"{name}\"");
    let start = helpers.find(&start_tag).unwrap_or_else(|| panic!("_helpers.tpl does not define {name}"));
    let rest = &helpers[start..];
    let body_start = rest.find("}}").expect("define action closed") + 2;
    let mut depth = 1usize;
    for action in actions(&rest[body_start..]) {
        match action.keyword.as_str() {
            "if" | "with" | "range" | "define" | "block" => depth += 1,
            "end" => {
                depth -= 1;
                if depth == 0 {
                    return rest[body_start..body_start + action.start].to_string();
                }
            }
            _ => {}
        }
    }
    panic!("define {name} is not closed");
}

/// `.Values.a.b.c` paths referenced in `text`, as "a.b.c".
fn values_refs(text: &str) -> Vec<String> {
    const MARK: &str = ".Values.";
    let mut refs = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(MARK) {
        let after = &rest[at + MARK.len()..];
        let len = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.')).unwrap_or(after.len());
        let path = after[..len].trim_end_matches('.');
        if !path.is_empty() {
            refs.push(path.to_string());
        }
        rest = &after[len..];
    }
    refs
}

/// The node at a dotted path, walking nested hashes only.
fn lookup<'a>(root: &'a Yaml, path: &str) -> Option<&'a Yaml> {
    let mut node = root;
    for segment in path.split('.') {
        match node {
            Yaml::Hash(hash) => node = hash.get(&Yaml::String(segment.to_string()))?,
            _ => return None,
        }
    }
    Some(node)
}

/// One `{{ … }}` action of a Go template.
struct Action {
    /// Byte offset of the opening `{{`.
    start: usize,
    /// First word of the action (`if`, `end`, `include`, …); empty for comments.
    keyword: String,
    /// The action's text without the delimiters and trim markers.
    body: String,
}

/// Splits a Go template into its actions, honouring "…" and `…` strings inside actions.
fn actions(text: &str) -> Vec<Action> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(open) = text[i..].find("{{").map(|o| o + i) {
        let inner = text[open + 2..].trim_start_matches('-').trim_start();
        if inner.starts_with("/*") {
            // A comment: `{{/* … */}}`, quotes inside it mean nothing.
            let comment_end = text[open..].find("*/").map(|e| e + open).expect("closed template comment");
            let close = text[comment_end..].find("}}").expect("closed comment action") + comment_end;
            out.push(Action { start: open, keyword: String::new(), body: String::new() });
            i = close + 2;
            continue;
        }
        let mut j = open + 2;
        let close = loop {
            assert!(j < bytes.len(), "unclosed {{{{ at byte {open}: {}", &text[open..text.len().min(open + 60)]);
            match bytes[j] {
                b'"' => {
                    j += 1;
                    while bytes[j] != b'"' {
                        j += if bytes[j] == b'\\' { 2 } else { 1 };
                    }
                    j += 1;
                }
                b'`' => {
                    j += 1 + text[j + 1..].find('`').expect("closed raw string");
                    j += 1;
                }
                b'}' if bytes.get(j + 1) == Some(&b'}') => break j,
                _ => j += 1,
            }
        };
        let body = text[open + 2..close].trim_start_matches('-').trim_end_matches('-').trim().to_string();
        let keyword = body.split(|c: char| c.is_whitespace() || c == '(').next().unwrap_or("").to_string();
        out.push(Action { start: open, keyword, body });
        i = close + 2;
    }
    out
}

/// Whether a values.yaml line defines a key (`key:` or `- key:`).
fn defines_key(line: &str) -> bool {
    let mut rest = line.trim_start();
    if let Some(item) = rest.strip_prefix("- ") {
        rest = item.trim_start();
    }
    let key_len = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
    key_len > 0 && rest[key_len..].starts_with(':')
}

#[test]
fn non_template_yaml_files_parse() {
    let dir = chart_dir();
    let templates_dir = dir.join("templates");
    let yaml_files: Vec<PathBuf> = files_under(&dir)
        .into_iter()
        .filter(|p| !p.starts_with(&templates_dir))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    for required in ["Chart.yaml", "values.yaml"] {
        assert!(yaml_files.contains(&dir.join(required)), "helm/walhook/{required} is missing");
    }
    for path in &yaml_files {
        let doc = load_yaml(path);
        assert!(matches!(doc, Yaml::Hash(_)), "{} should be a mapping", path.display());
    }
}

#[test]
fn values_reference_parser_finds_paths() {
    let refs = values_refs("{{ .Values.a.b_c }} {{- if .Values.d. }}x{{ $.Values.e.f | quote }}{{ .Values.g}}");
    assert_eq!(refs, ["a.b_c", "d", "e.f", "g"]);
    let values = values();
    assert!(lookup(&values, "image.repository").is_some());
    assert!(lookup(&values, "image.repository.more").is_none(), "a scalar ends the path");
    assert!(lookup(&values, "image.nope").is_none());
}

#[test]
fn every_values_reference_exists_in_values_yaml() {
    let values = values();
    let mut missing = BTreeSet::new();
    let mut seen = 0;
    for (name, text) in templates() {
        for path in values_refs(&text) {
            seen += 1;
            if lookup(&values, &path).is_none() {
                missing.insert(format!("{name}: .Values.{path}"));
            }
        }
    }
    assert!(seen > 50, "suspiciously few .Values references ({seen})");
    assert!(missing.is_empty(), "templates use values missing from values.yaml:\n{}", fmt_set(&missing));
}

#[test]
fn every_values_key_is_commented() {
    let text = read(&chart_dir().join("values.yaml"));
    let lines: Vec<&str> = text.lines().collect();
    let mut undocumented = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with('#') || !defines_key(line) {
            continue;
        }
        let trailing_comment = line.contains(" #");
        let previous = lines[..n].iter().rev().find(|l| !l.trim().is_empty());
        let commented_above = previous.is_some_and(|l| l.trim_start().starts_with('#'));
        if !(trailing_comment || commented_above) {
            undocumented.push(format!("values.yaml:{}: {}", n + 1, line.trim()));
        }
    }
    assert!(undocumented.is_empty(), "values keys without a comment above them:\n{}", undocumented.join("\n"));
}

#[test]
fn chart_metadata_matches_the_crate() {
    let chart = load_yaml(&chart_dir().join("Chart.yaml"));
    assert_eq!(chart["apiVersion"].as_str(), Some("v2"));
    assert_eq!(chart["name"].as_str(), Some("walhook"));
    assert!(chart["version"].as_str().is_some_and(|v| !v.is_empty()), "Chart.yaml needs a version");
    assert!(chart["description"].as_str().is_some_and(|d| !d.is_empty()), "Chart.yaml needs a description");
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "Chart.yaml appVersion (a quoted string) must equal the crate version"
    );
}

#[test]
fn templates_keep_probes_hardening_and_secret_refs() {
    let all = all_templates();
    for needle in [
        "path: /healthz",
        "path: /readyz",
        "runAsNonRoot: true",
        "readOnlyRootFilesystem:",
        "allowPrivilegeEscalation: false",
        "- ALL",
        "RuntimeDefault",
        "kind: PodDisruptionBudget",
        "checksum/config",
        "terminationGracePeriodSeconds",
        "mountPath: /etc/walhook",
        "\"run\", \"--config\", \"/etc/walhook/walhook.toml\"",
        "\"migrate\", \"--config\", \"/etc/walhook/walhook.toml\"",
        "helm.sh/hook: pre-install,pre-upgrade",
        "kind: ServiceMonitor",
        "kind: PrometheusRule",
    ] {
        assert!(all.contains(needle), "the templates no longer contain {needle:?}");
    }
    let values = values();
    assert_eq!(values["securityContext"]["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(values["podSecurityContext"]["runAsUser"].as_i64(), Some(10001));
    assert_eq!(values["metrics"]["serviceMonitor"]["enabled"].as_bool(), Some(false));
    assert_eq!(values["metrics"]["prometheusRule"]["enabled"].as_bool(), Some(false));
    assert_eq!(values["migrate"]["enabled"].as_bool(), Some(true));

    // Each secret variable is filled from a Secret, right where it is declared.
    for var in ["WALHOOK_DATABASE__URL", "WALHOOK_AUTH__JWT_HS256_SECRET", "WALHOOK_SECRETS__ENCRYPTION_KEY"] {
        let at = all.find(&format!("name: {var}")).unwrap_or_else(|| panic!("the templates do not set {var}"));
        let next = &all[at..(at + 120).min(all.len())];
        assert!(next.contains("secretKeyRef:"), "{var} should come from a secretKeyRef:\n{next}");
    }
    for (name, text) in templates() {
        assert!(!text.contains("value: {{ .Values.secret."), "{name} puts a secret value into the pod spec");
    }
}

#[test]
fn alerts_carry_runbook_links() {
    let rules = template("prometheusrule.yaml");
    for alert in
        ["WalhookSlotLagHigh", "WalhookReplicationDown", "WalhookDeliveryFailureRate", "WalhookOldestPendingTooOld"]
    {
        assert!(rules.contains(&format!("alert: {alert}")), "prometheusrule.yaml lacks {alert}");
        let anchor = format!("#{}", alert.to_lowercase());
        assert!(rules.contains(&anchor), "{alert} needs a runbook_url ending in {anchor}");
    }
    assert!(rules.matches("runbook_url:").count() >= 4);
    let base = values()["metrics"]["prometheusRule"]["runbookBaseUrl"].as_str().map(str::to_string);
    assert!(
        base.is_some_and(|b| b.ends_with("docs/operations.md")),
        "runbookBaseUrl should point at docs/operations.md"
    );
}

#[test]
fn configmap_holds_no_secrets() {
    let configmap = template("configmap.yaml");
    let toml_template = helper_body("walhook.configToml");
    assert!(configmap.contains("include \"walhook.configToml\""), "configmap.yaml should render walhook.configToml");
    for (name, text) in [("configmap.yaml", &configmap), ("walhook.configToml", &toml_template)] {
        for secret in ["jwt_hs256_secret", "encryption_key", "database.url", ".Values.secret."] {
            assert!(!text.contains(secret), "{name} mentions {secret}; secrets belong in env vars");
        }
        for line in text.lines() {
            let key = line.trim_start().split(['=', ' ']).next().unwrap_or("");
            assert_ne!(key, "url", "{name} renders a database url: {line}");
        }
    }
    let values = values();
    for secret in ["database.url", "auth.jwt_hs256_secret", "secrets.encryption_key", "secrets"] {
        assert!(
            lookup(&values["config"], secret).is_none(),
            "values.yaml config.{secret} would end up in the ConfigMap"
        );
    }
}

/// The keys walhook knows per section, from its embedded defaults (config/default.toml).
fn walhook_keys() -> BTreeMap<String, BTreeSet<String>> {
    let defaults: toml::Table = walhook::config::DEFAULT_TOML.parse().expect("default.toml parses");
    defaults
        .iter()
        .map(|(section, table)| {
            let keys = table.as_table().expect("section table").keys().cloned().collect();
            (section.clone(), keys)
        })
        .collect()
}

/// Optional non-secret keys absent from default.toml.
const OPTIONAL_KEYS: &[(&str, &str)] = &[("database", "ca_cert"), ("auth", "jwt_audience"), ("auth", "jwt_issuer")];

#[test]
fn toml_template_keys_match_walhook_and_their_values() {
    let mut known = walhook_keys();
    for (section, key) in OPTIONAL_KEYS {
        known.entry(section.to_string()).or_default().insert(key.to_string());
    }
    let body = helper_body("walhook.configToml");
    let mut section = String::new();
    let mut rendered: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in body.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            assert!(known.contains_key(&section), "walhook.configToml renders an unknown section [{section}]");
            continue;
        }
        let Some((key, value)) = line.split_once(" = ") else { continue };
        let key = key.trim();
        if key.starts_with('{') || key.starts_with('#') {
            continue;
        }
        assert!(
            known.get(&section).is_some_and(|keys| keys.contains(key)),
            "walhook.configToml renders {section}.{key}, which walhook does not know"
        );
        for path in values_refs(value) {
            assert_eq!(path, format!("config.{section}.{key}"), "{section}.{key} is rendered from .Values.{path}");
        }
        rendered.entry(section.clone()).or_default().insert(key.to_string());
    }
    // ca_cert is rendered inside `with`, so its line holds `.`; it counts as rendered.
    for (section, key) in OPTIONAL_KEYS {
        rendered.entry(section.to_string()).or_default().insert(key.to_string());
    }
    known.remove("secrets");
    assert_eq!(rendered, known, "walhook.configToml should render every non-secret key walhook knows");
}

/// YAML scalar/sequence/mapping as the TOML value the chart renders for it.
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
        other => panic!("values.yaml config holds a value the TOML template cannot render: {other:?}"),
    }
}

#[test]
fn values_config_mirrors_walhook_defaults_and_loads() {
    let values = values();
    let config = yaml_to_toml(&values["config"]);
    let config = config.as_table().expect("config is a mapping");
    let defaults: toml::Table = walhook::config::DEFAULT_TOML.parse().expect("default.toml parses");

    let mut differences = BTreeSet::new();
    for (section, table) in config {
        let table = table.as_table().unwrap_or_else(|| panic!("config.{section} should be a mapping"));
        for (key, value) in table {
            let default = defaults.get(section).and_then(|s| s.get(key));
            match default {
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
    assert!(differences.is_empty(), "values.yaml config differs from walhook's defaults:\n{}", fmt_set(&differences));

    // What the ConfigMap holds (empty optional values are left out, as the template does) plus
    // the database URL from the environment must be a configuration walhook accepts.
    let mut file = config.clone();
    let database = file.get_mut("database").and_then(toml::Value::as_table_mut).expect("config.database");
    if database.get("ca_cert").and_then(toml::Value::as_str) == Some("") {
        database.remove("ca_cert");
    }
    database.insert("url".into(), toml::Value::String("postgres://walhook:pw@db:5432/driftwood".into()));
    let text = toml::to_string(&file).expect("serialize TOML");
    if let Err(e) = walhook::config::Config::from_toml(&text) {
        panic!("walhook rejects the chart's default configuration: {e}\n{text}");
    }
}

#[test]
fn template_actions_balance_and_includes_resolve() {
    let templates = templates();
    let mut defined = BTreeSet::new();
    for (_, text) in &templates {
        for action in actions(text) {
            if action.keyword == "define" {
                defined.insert(action.body.split('"').nth(1).expect("define name").to_string());
            }
        }
    }
    for (name, text) in &templates {
        let mut open: Vec<String> = Vec::new();
        for action in actions(text) {
            match action.keyword.as_str() {
                "if" | "with" | "range" | "define" | "block" => open.push(action.keyword.clone()),
                "end" => {
                    open.pop().unwrap_or_else(|| panic!("{name}: {{{{ end }}}} without an opening action"));
                }
                "else" => assert!(!open.is_empty(), "{name}: else outside if/with/range"),
                _ => {}
            }
            let mut rest = action.body.as_str();
            while let Some(at) = rest.find("include \"").or_else(|| rest.find("template \"")) {
                let after = &rest[at..];
                let quoted = after.split('"').nth(1).expect("quoted template name");
                assert!(defined.contains(quoted), "{name}: include of undefined template {quoted:?}");
                rest = &after[after.find('"').expect("quote") + quoted.len() + 2..];
            }
        }
        assert!(open.is_empty(), "{name}: unclosed {open:?}");
    }
}

#[test]
fn chart_has_notes_and_readme() {
    let notes = template("NOTES.txt");
    for needle in ["/readyz", "/metrics", "migrate", "Secret"] {
        assert!(notes.contains(needle), "NOTES.txt should mention {needle}");
    }
    let readme = read(&chart_dir().join("README.md"));
    for needle in ["helm install", "existingSecret", "Upgrading"] {
        assert!(readme.contains(needle), "helm/walhook/README.md should mention {needle}");
    }
}

fn fmt_set(set: &BTreeSet<String>) -> String {
    set.iter().cloned().collect::<Vec<_>>().join("\n")
}

#[test]
fn every_alert_has_a_runbook_section_in_the_operations_guide() {
    let rules = template("prometheusrule.yaml");
    let guide = read(&chart_dir().join("../../docs/operations.md"));
    let alerts: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).map(str::trim).collect();
    assert!(alerts.len() >= 4, "alerts found: {alerts:?}");
    for alert in alerts {
        assert!(guide.contains(&format!("### {alert}\n")), "docs/operations.md lacks a `### {alert}` runbook section");
        assert!(rules.contains(&format!("\"%s#{}\"", alert.to_lowercase())), "{alert}'s runbook_url points elsewhere");
    }
}
