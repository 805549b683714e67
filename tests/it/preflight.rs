//! `walhook run` refuses to start, saying what to change, when the database is not ready:
//! not migrated, deletes that would lose account_id, a missing table, wal_level not logical,
//! a role without REPLICATION, or a slot another process streams.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{cluster, own_cluster, wait_for, Env, Readiness};

/// Runs `walhook run` and expects it to fail with every one of `needles` in its output.
async fn refuses(env: &Env, extra: &str, needles: &[&str]) {
    let mut proc = env.spawn_binary(extra);
    let status = proc.wait_exit(Duration::from_secs(60)).await.expect("walhook exits");
    let log = proc.log_text();
    assert!(!status.success(), "walhook should refuse to start:\n{log}");
    for n in needles {
        assert!(log.contains(n), "output should mention {n:?}:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmigrated_database_is_refused() {
    let env = Env::unmigrated(cluster(), "pre_unmigrated").await;
    refuses(&env, "", &["walhook migrate", "publication pre_unmigrated does not exist"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_that_would_lose_account_id_are_refused() {
    let env = Env::new("pre_identity").await;
    env.sql("ALTER TABLE contacts REPLICA IDENTITY DEFAULT").await;
    refuses(
        &env,
        "",
        &["public.contacts", "REPLICA IDENTITY DEFAULT (primary key id)", "account_id", "REPLICA IDENTITY FULL"],
    )
    .await;
    // An identity index that includes account_id is fine.
    env.sql(
        "CREATE UNIQUE INDEX contacts_ident ON contacts (id, account_id);
         ALTER TABLE contacts REPLICA IDENTITY USING INDEX contacts_ident;",
    )
    .await;
    let mut proc = env.spawn_binary("");
    env.ready(Readiness::Streaming).await;
    proc.sigterm();
    assert!(proc.wait_exit(Duration::from_secs(30)).await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_crm_table_is_refused_by_run_and_migrate() {
    let env = Env::unmigrated(cluster(), "pre_missing_table").await;
    env.sql("DROP TABLE projects").await;
    let mut migrate = env.spawn_command("migrate", "");
    let status = migrate.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert!(!status.success());
    assert!(migrate.log_text().contains("public.projects"), "{}", migrate.log_text());
    let schema = env.scalar_i64("SELECT count(*) FROM pg_namespace WHERE nspname = 'walhook'").await;
    assert_eq!(schema, 0, "a refused migrate leaves nothing behind");
    refuses(&env, "", &["public.projects does not exist"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_replication_is_refused() {
    let env = Env::new("pre_no_replication").await;
    env.sql(
        "CREATE ROLE crm_app LOGIN; GRANT ALL ON ALL TABLES IN SCHEMA public, walhook TO crm_app;
         GRANT USAGE ON SCHEMA walhook TO crm_app;",
    )
    .await;
    let url = env.url.replace("postgres://postgres@", "postgres://crm_app@");
    refuses(&env, &format!("[database]\nurl = \"{url}\"\n"), &["ALTER ROLE crm_app REPLICATION"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_refused() {
    let cluster = tokio::task::spawn_blocking(|| own_cluster(&["wal_level = replica"])).await.unwrap();
    let env = Env::unmigrated(&cluster, "pre_wal_level").await;
    // `walhook migrate` cannot create the slot, and says why.
    let mut migrate = env.spawn_command("migrate", "");
    let status = migrate.wait_exit(Duration::from_secs(60)).await.expect("migrate ends");
    let out = migrate.log_text();
    assert!(!status.success(), "migrate must fail without logical WAL:\n{out}");
    assert!(out.contains("wal_level is 'replica'") && out.contains("wal_level = logical"), "{out}");
    // And `walhook run` refuses to start, naming the same fix.
    refuses(&env, "", &["wal_level is 'replica'", "wal_level = logical"]).await;
    drop(env);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_streamed_by_another_process_is_refused() {
    // (`walhook migrate` created the slot.)
    let env = Env::new("pre_slot_busy").await;
    let mut other = Command::new(cluster().bindir().join("pg_recvlogical"))
        .args(["-h", "127.0.0.1", "-p", &cluster().port().to_string(), "-U", "postgres", "-d", "pre_slot_busy"])
        .args(["--slot", "pre_slot_busy", "--start", "-f", "/dev/null"])
        .args(["-o", "proto_version=1", "-o", "publication_names=pre_slot_busy"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pg_recvlogical");
    wait_for(Duration::from_secs(20), || async {
        // (Other tests of the shared cluster may run pg_recvlogical too: only this slot's counts.)
        env.scalar_i64(
            "SELECT count(*) FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = 'pre_slot_busy' AND r.application_name = 'pg_recvlogical'",
        )
        .await
            == 1
    })
    .await;
    refuses(&env, "", &["replication slot pre_slot_busy is in use by another process", "pg_recvlogical"]).await;
    let _ = other.kill();
    let _ = other.wait();
}

/// A check whose query fails says which check it was and the database's error, never that
/// the schema is old (the version could not be read, so nothing is known about it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_preflight_query_says_what_failed_not_an_old_schema() {
    let env = Env::new("pre_query_fails").await;
    // Reading the version now fails with an error that is neither "missing" nor "denied".
    env.sql(
        "DROP TABLE walhook.schema_migrations;
         CREATE FUNCTION walhook.broken_version() RETURNS int LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'version storage is broken'; END $$;
         CREATE VIEW walhook.schema_migrations AS SELECT walhook.broken_version() AS version;",
    )
    .await;
    let mut proc = env.spawn_binary("");
    let status = proc.wait_exit(Duration::from_secs(60)).await.expect("walhook exits");
    let log = proc.log_text();
    assert!(!status.success(), "walhook should refuse to start:\n{log}");
    assert!(log.contains("reading walhook's schema version"), "the error should say what failed:\n{log}");
    assert!(log.contains("version storage is broken"), "the error should keep its cause:\n{log}");
    assert!(!log.contains("is at version 0"), "an unreadable version is not an old schema:\n{log}");
}
