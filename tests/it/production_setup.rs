//! The README's production setup, followed word for word: the CRM's tables belong to their own
//! (non-superuser) owner, the DBA runs the SQL of "Preparing the CRM database" as written
//! there, `walhook migrate` runs as the tables' owner, and `walhook run` as the `walhook` role
//! it created (REPLICATION, not a superuser). Then the API answers, an endpoint is created
//! through it, and a CRM change is delivered to it, signed.
//!
//! What must hold: what the README tells an operator to do is enough for walhook to run.

use std::time::Duration;

use crate::common::{cluster, wait_for, Env, ACCOUNT_A, USER};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const DB: &str = "readme_setup";
const TOKEN: &str = "readme-operator-token-5d2a";

/// The SQL block of the README's "Preparing the CRM database", as the README shows it.
fn readme_sql() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme.find("### Preparing the CRM database").expect("README section")..];
    let block = &section[section.find("```sql").expect("an sql block in the section") + "```sql".len()..];
    block[..block.find("```").expect("closed sql block")].to_string()
}

/// `section.key = value` lines the README's section tells the operator to put into walhook's
/// configuration, as a TOML fragment (those written as `key = value` inside `toml` blocks).
fn readme_config() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("### Preparing the CRM database").unwrap();
    let end = start + readme[start..].find("\n## ").unwrap_or(readme.len() - start);
    let mut toml = String::new();
    let mut rest = &readme[start..end];
    while let Some(at) = rest.find("```toml") {
        let block = &rest[at + "```toml".len()..];
        let close = block.find("```").expect("closed toml block");
        toml.push_str(&block[..close].lines().map(str::trim).collect::<Vec<_>>().join("\n"));
        toml.push('\n');
        rest = &block[close..];
    }
    toml
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_production_setup_runs_as_written() {
    let env = Env::unmigrated(cluster(), DB).await;
    // The CRM as it was before walhook: its owner is the application's role, not a superuser.
    env.sql(&format!(
        "CREATE ROLE crm_owner LOGIN;
         ALTER DATABASE {DB} OWNER TO crm_owner;
         ALTER SCHEMA public OWNER TO crm_owner;
         ALTER TABLE contacts OWNER TO crm_owner; ALTER TABLE companies OWNER TO crm_owner;
         ALTER TABLE activities OWNER TO crm_owner; ALTER TABLE projects OWNER TO crm_owner;"
    ))
    .await;

    // 2. The DBA creates walhook's role with the README's SQL (the database is ours, not
    //    "driftwood"; the password is whatever the DBA picks).
    let sql = readme_sql().replace("driftwood", DB).replace("'…'", "'readme-pw'");
    assert!(sql.contains("CREATE ROLE walhook"), "the README's SQL creates the walhook role:\n{sql}");
    env.sql(&sql).await;
    let superuser = env.scalar_i64("SELECT count(*) FROM pg_roles WHERE rolname = 'walhook' AND rolsuper").await;
    assert_eq!(superuser, 0, "the README's role is not a superuser");

    // The configuration both commands read: the README's keys plus this test's listeners.
    let sha = hex(&Sha256::digest(TOKEN.as_bytes()));
    let config = format!(
        "{}\n[auth]\nstatic_tokens = [{{ token_sha256 = \"{sha}\", account_id = \"{ACCOUNT_A}\", user_id = \"{USER}\" }}]\n",
        readme_config()
    );
    let as_role = |role: &str| {
        let url = env.url.replace("postgres://postgres@", &format!("postgres://{role}:readme-pw@"));
        let mut merged: toml::Table = config.parse().unwrap_or_else(|e| panic!("README config: {e}\n{config}"));
        let database = merged.entry("database").or_insert(toml::Value::Table(Default::default()));
        database.as_table_mut().unwrap().insert("url".into(), toml::Value::String(url));
        toml::to_string(&merged).unwrap()
    };

    // 3. `walhook migrate`, once, as the tables' owner.
    let mut migrate = env.spawn_command("migrate", &as_role("crm_owner"));
    let status = migrate.wait_exit(Duration::from_secs(60)).await.expect("migrate exits");
    assert!(status.success(), "walhook migrate as the owner failed:\n{}", migrate.log_text());

    // `walhook run` as the README's role.
    let mut run = env.spawn_binary(&as_role("walhook"));
    let streaming = format!(
        "SELECT count(*) FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
         WHERE s.slot_name = '{DB}' AND r.usename = 'walhook'"
    );
    let mut exited = None;
    wait_for(Duration::from_secs(60), || {
        exited = run.child.try_wait().unwrap();
        let q = streaming.clone();
        let env = &env;
        let done = exited.is_some();
        async move { done || env.scalar_i64(&q).await == 1 }
    })
    .await;
    assert!(exited.is_none(), "walhook run as role walhook exited ({exited:?}):\n{}", run.log_text());

    // The API answers; an endpoint created through it receives a CRM change, signed.
    let http = reqwest::Client::new();
    let api = |op: &'static str, body: Value| {
        let http = http.clone();
        let url = format!("http://127.0.0.1:{}/api/{op}", env.api_port);
        async move {
            let r = http
                .post(url)
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap())
        }
    };
    let (status, created) = api(
        "webhooks-create",
        json!({"url": env.receiver.url("readme"), "events": ["contact.created"], "description": "README setup"}),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    env.receiver.set_secret("readme", created["result"]["signing_secret"].as_str().unwrap());
    let id = created["result"]["endpoint"]["id"].as_str().unwrap().to_string();
    // The endpoint reaches routing through the stream, before the row committed after it.
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{ACCOUNT_A}', 'Readme')")).await;
    env.receiver
        .wait_until(Duration::from_secs(20), |r| !r.is_empty())
        .await
        .unwrap_or_else(|_| panic!("no webhook delivered:\n{}", run.log_text()));
    let got = &env.receiver.received_on("/readme")[0];
    assert!(got.verified, "the signature verifies with the secret the API returned");
    assert_eq!(got.json()["data"]["first_name"], "Readme");

    let (status, listed) = api("webhooks-list", json!({})).await;
    assert_eq!((status, listed["result"]["endpoints"][0]["id"].as_str()), (200, Some(id.as_str())));
    wait_for(Duration::from_secs(20), || async {
        let (_, d) = api("webhooks-deliveries", json!({"endpoint_id": id})).await;
        d["result"]["deliveries"][0]["status"] == "delivered"
    })
    .await;
    run.sigterm();
    let status = run.wait_exit(Duration::from_secs(30)).await.expect("walhook stops on SIGTERM");
    assert!(status.success(), "{}", run.log_text());

    // What migrate granted is what run needs and nothing more.
    let url = env.url.replace("postgres://postgres@", "postgres://walhook:readme-pw@");
    let (walhook, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    for forbidden in [
        "CREATE TABLE walhook.extra (id int)",
        "TRUNCATE walhook.deliveries",
        "INSERT INTO walhook.schema_migrations (version, name) VALUES (999, 'x')",
        "DROP TABLE walhook.attempts",
        "ALTER TABLE walhook.endpoints ADD COLUMN x int",
    ] {
        let e = walhook.batch_execute(forbidden).await.expect_err(forbidden);
        assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE), "{forbidden}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_names_a_runtime_role_that_does_not_exist() {
    let env = Env::unmigrated(cluster(), "setup_no_role").await;
    let mut migrate = env.spawn_command("migrate", "[database]\nruntime_role = \"walhook_missing\"\n");
    let status = migrate.wait_exit(Duration::from_secs(60)).await.expect("migrate exits");
    let log = migrate.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains("database.runtime_role: role walhook_missing does not exist"), "{log}");
    let schema = env.scalar_i64("SELECT count(*) FROM pg_namespace WHERE nspname = 'walhook'").await;
    assert_eq!(schema, 0, "a refused migrate changes nothing");
}

/// Without the grants (migrate ran as the owner without `database.runtime_role`), `walhook
/// run` says the role lacks privileges, with the GRANT to run, not that the schema is old.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_role_without_grants_is_told_which_grant_to_run() {
    let env = Env::new("setup_no_grants").await;
    env.sql(
        "CREATE ROLE walhook_bare LOGIN REPLICATION;
         GRANT USAGE ON SCHEMA public TO walhook_bare;
         GRANT SELECT ON contacts, companies, activities, projects TO walhook_bare;",
    )
    .await;
    let url = env.url.replace("postgres://postgres@", "postgres://walhook_bare@");
    let mut run = env.spawn_binary(&format!("[database]\nurl = \"{url}\"\n"));
    let status = run.wait_exit(Duration::from_secs(60)).await.expect("walhook exits");
    let log = run.log_text();
    assert!(!status.success(), "{log}");
    for needle in [
        "role walhook_bare lacks USAGE on schema walhook",
        "INSERT on walhook.deliveries",
        "database.runtime_role = \"walhook_bare\"",
        "GRANT USAGE ON SCHEMA walhook TO walhook_bare",
        "GRANT SELECT ON walhook.schema_migrations TO walhook_bare",
    ] {
        assert!(log.contains(needle), "the refusal should say {needle:?}:\n{log}");
    }
    assert!(!log.contains("schema is at version 0"), "a permission problem is not an old schema:\n{log}");

    // Running the GRANT it names is enough.
    let grant = log[log.find("GRANT USAGE ON SCHEMA").unwrap()..].lines().next().unwrap().to_string();
    env.sql(&grant).await;
    let mut run = env.spawn_binary(&format!("[database]\nurl = \"{url}\"\n"));
    let q = "SELECT count(*) FROM pg_stat_replication WHERE usename = 'walhook_bare'";
    let mut exited = None;
    wait_for(Duration::from_secs(60), || {
        exited = run.child.try_wait().unwrap();
        let done = exited.is_some();
        let env = &env;
        async move { done || env.scalar_i64(q).await == 1 }
    })
    .await;
    assert!(exited.is_none(), "walhook run exited after the GRANT:\n{}", run.log_text());
}

/// walhook on the database host connects over the Unix socket, in both spellings of the URL,
/// with sslmode's default (prefer) and disable: migrate, stream, deliver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_database_url_connects() {
    let env = Env::unmigrated(cluster(), "setup_unix_socket").await;
    let dir = cluster().socket_dir().display().to_string();
    let port = cluster().port();
    for (n, url) in [
        format!("host={dir} port={port} dbname=setup_unix_socket user=postgres"),
        format!("postgresql:///setup_unix_socket?host={dir}&port={port}&user=postgres&sslmode=disable"),
    ]
    .into_iter()
    .enumerate()
    {
        let extra = format!("[database]\nurl = \"{url}\"\n");
        let db = walhook::pg::db::Db::new(&env.config(&extra).database).expect("the URL is accepted");
        walhook::app::migrate(&db, &env.config(&extra)).await.unwrap_or_else(|e| panic!("migrate over {url}: {e}"));
        if n == 0 {
            env.endpoint(ACCOUNT_A, "hook", &["contact.created"]).await;
        }
        let wh = env.start(&extra).await;
        env.sql(&format!(
            "INSERT INTO contacts (account_id, first_name) VALUES ('{ACCOUNT_A}', 'over-the-socket-{n}')"
        ))
        .await;
        env.receiver
            .wait_until(Duration::from_secs(20), |rs| {
                rs.iter().any(|r| r.json()["data"]["first_name"] == format!("over-the-socket-{n}"))
            })
            .await
            .unwrap_or_else(|_| panic!("delivered over {url}"));
        wh.stop().await.unwrap();
    }
}
