//! Bad configuration stops start-up with an error naming the key, and `check-config` never
//! prints a secret.

use std::process::Command;

fn check_config(toml: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walhook.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walhook"));
    cmd.args(["check-config", "--config", path.to_str().unwrap()]).env_remove("WALHOOK_TEST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const OK: &str = "[database]\nurl = \"postgres://walhook:hunter2@db.internal:5432/driftwood\"\n";

fn fails_naming(toml: &str, env: &[(&str, &str)], key: &str) {
    let (ok, _, err) = check_config(toml, env);
    assert!(!ok, "config should be refused: {toml}");
    assert!(err.contains(key), "error should name {key}: {err}");
}

#[test]
fn unknown_keys_are_named() {
    fails_naming(&format!("{OK}[dispatch]\nretries = 3\n"), &[], "dispatch.retries");
    fails_naming(&format!("{OK}[bogus]\nx = 1\n"), &[], "bogus");
}

#[test]
fn missing_database_url_is_named() {
    fails_naming("[api]\nlisten = \"0.0.0.0:8080\"\n", &[], "database.url");
}

#[test]
fn bad_values_are_named() {
    for (section, key, value) in [
        ("dispatch", "request_timeout", "\"soon\""),
        ("dispatch", "retry_schedule", "[\"5s\", \"later\"]"),
        ("dispatch", "retry_schedule", "[]"),
        ("dispatch", "allowed_cidrs", "[\"10.0.0.0/33\"]"),
        ("dispatch", "jitter", "2.0"),
        ("dispatch", "max_concurrency", "0"),
        ("dispatch", "ca_certs", "[\"/nonexistent/ca.pem\"]"),
        ("replication", "slot", "\"Bad-Slot\""),
        ("replication", "replica_identity_full", "\"yes\""),
        ("api", "listen", "\"not an address\""),
        ("log", "format", "\"xml\""),
        ("secrets", "encryption_key", "\"c2hvcnQ=\""),
    ] {
        fails_naming(&format!("{OK}[{section}]\n{key} = {value}\n"), &[], &format!("{section}.{key}"));
    }
    fails_naming("[database]\nurl = \"postgres://h/db?sslmode=sometimes\"\n", &[], "database.url");
    fails_naming(
        &format!("{OK}[auth]\nstatic_tokens = [{{ token_sha256 = \"abc\", account_id = \"aaaa0000-0000-4000-8000-000000000001\", user_id = \"aaaa0000-0000-4000-8000-000000000001\" }}]\n"),
        &[],
        "auth.static_tokens[0].token_sha256",
    );
}

#[test]
fn bad_environment_values_are_named_with_their_variable() {
    let (ok, _, err) = check_config(OK, &[("WALHOOK_DISPATCH__MAX_CONCURRENCY", "lots")]);
    assert!(!ok);
    assert!(err.contains("dispatch.max_concurrency") && err.contains("WALHOOK_DISPATCH__MAX_CONCURRENCY"), "{err}");
}

#[test]
fn a_bad_array_element_from_the_environment_is_blamed_on_its_variable() {
    let (ok, _, err) = check_config(OK, &[("WALHOOK_DISPATCH__ALLOWED_CIDRS", "[\"notacidr\"]")]);
    assert!(!ok);
    assert!(err.contains("dispatch.allowed_cidrs") && err.contains("WALHOOK_DISPATCH__ALLOWED_CIDRS"), "{err}");
    assert!(!err.contains("(in "), "not blamed on the file: {err}");
}

#[test]
fn a_log_level_that_names_no_level_is_refused() {
    for bad in ["not a level!!", "inf", "walhook=loud", "", "info,walhook=verbose"] {
        let (ok, _, err) = check_config(&format!("{OK}[log]\nlevel = \"{bad}\"\n"), &[]);
        assert!(!ok, "log.level = {bad:?} must be refused");
        assert!(err.contains("log.level"), "{err}");
    }
    for good in ["info", "warn,walhook=debug", "INFO", "off", "info,walhook::store=trace"] {
        let (ok, _, err) = check_config(&format!("{OK}[log]\nlevel = \"{good}\"\n"), &[]);
        assert!(ok, "log.level = {good:?} is fine: {err}");
    }
}

#[test]
fn a_rust_log_that_names_no_level_is_refused_naming_it() {
    let (ok, _, err) = check_config(OK, &[("RUST_LOG", "inf")]);
    assert!(!ok, "RUST_LOG=inf would silence every line");
    assert!(err.contains("RUST_LOG"), "{err}");
    let (ok, _, err) = check_config(OK, &[("RUST_LOG", "info,walhook=debug")]);
    assert!(ok, "{err}");
}

#[test]
fn environment_overrides_the_file() {
    let (ok, out, err) = check_config(
        OK,
        &[("WALHOOK_REPLICATION__SLOT", "from_env"), ("WALHOOK_DISPATCH__RETRY_SCHEDULE", "[\"1s\",\"2s\"]")],
    );
    assert!(ok, "{err}");
    assert!(out.contains("slot = \"from_env\""), "{out}");
    assert!(out.contains("retry_schedule = [\n    \"1s\",\n    \"2s\",\n]") || out.contains("\"2s\""), "{out}");
}

#[test]
fn check_config_redacts_secrets() {
    let toml = format!(
        "{OK}[auth]\njwt_hs256_secret = \"jwt-signing-key-do-not-print-at-all-ever\"\n[secrets]\nencryption_key = \"{}\"\n",
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
    );
    let (ok, out, err) = check_config(&toml, &[]);
    assert!(ok, "{err}");
    for secret in
        ["hunter2", "jwt-signing-key-do-not-print-at-all-ever", "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="]
    {
        assert!(!out.contains(secret) && !err.contains(secret), "{secret} printed:\n{out}");
    }
    assert!(out.contains("db.internal"), "the rest of the URL is shown: {out}");
}

#[test]
fn a_refused_encryption_key_is_not_echoed() {
    let (ok, _, err) = check_config(&format!("{OK}[secrets]\nencryption_key = \"not-base64-but-secret!!\"\n"), &[]);
    assert!(!ok);
    assert!(!err.contains("not-base64-but-secret"), "{err}");
}

#[test]
fn a_short_or_empty_jwt_key_is_refused_naming_the_key() {
    let short = "thirty-one-bytes-is-not-enough!";
    assert_eq!(short.len(), 31);
    for value in ["", short] {
        let (ok, _, err) = check_config(&format!("{OK}[auth]\njwt_hs256_secret = \"{value}\"\n"), &[]);
        assert!(!ok, "a {}-byte key is refused", value.len());
        assert!(err.contains("auth.jwt_hs256_secret") && err.contains("32 bytes"), "{err}");
        assert!(value.is_empty() || !err.contains(value), "the key is not echoed: {err}");
    }
    // An empty environment variable (a Kubernetes Secret with an empty value) too.
    fails_naming(OK, &[("WALHOOK_AUTH__JWT_HS256_SECRET", "")], "auth.jwt_hs256_secret");
    let (ok, _, err) = check_config(OK, &[("WALHOOK_AUTH__JWT_HS256_SECRET", "0123456789abcdef0123456789abcdef")]);
    assert!(ok, "32 bytes are enough: {err}");
}

#[test]
fn check_config_redacts_the_password_in_every_form_of_database_url() {
    for (url, secret, shown) in [
        (
            "postgres://walhook@db.internal/driftwood?password=query-secret-1&sslmode=require",
            "query-secret-1",
            "db.internal",
        ),
        (
            "postgresql://walhook:url-secret-2@db1.internal:5432,db2.internal:5433/driftwood",
            "url-secret-2",
            "db2.internal",
        ),
        ("host=db.internal user=walhook password=kv-secret-3 dbname=driftwood", "kv-secret-3", "db.internal"),
        ("host=db.internal password='quoted secret-4' dbname=driftwood", "secret-4", "db.internal"),
        ("host=db.internal password = spaced-secret-5 dbname=driftwood", "spaced-secret-5", "db.internal"),
        ("host=db.internal password='it\\'s-secret-6' dbname=driftwood", "s-secret-6", "db.internal"),
        ("postgres://walhook:p%40ss-secret-7@db.internal/driftwood", "ss-secret-7", "db.internal"),
    ] {
        let toml = format!("[database]\nurl = {}\n", toml::Value::String(url.into()));
        let (ok, out, err) = check_config(&toml, &[]);
        assert!(ok, "{url}: {err}");
        assert!(!out.contains(secret) && !err.contains(secret), "{secret} printed:\n{out}");
        assert!(out.contains(shown), "the rest of the connection string is shown: {out}");
        assert!(out.contains("REDACTED"), "{out}");
    }
}
