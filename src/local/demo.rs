//! `walhook demo`: the whole pipeline on this machine, with nothing to set up.
//!
//! A throwaway PostgreSQL cluster gets the sample CRM schema and walhook's migrations; a local
//! HTTPS receiver (with its own CA) registers as an endpoint of account A; a few CRM writes
//! follow, one of them in account B; each webhook is printed as it arrives, with whether its
//! signature verified. What must hold: it leaves nothing behind, account B's write never
//! reaches account A's endpoint, and it prints walhook's own lines only: the server's log goes
//! to a file inside the cluster's directory, the client library's notices and the pool's
//! chatter are filtered out, and every connection closes before the cluster stops.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::admin::endpoints::{Caller, Endpoints, NewEndpoint};
use crate::config::Config;
use crate::local::cluster::{ClusterOptions, TempCluster};
use crate::local::receiver::{Received, Receiver};
use crate::local::tls::LocalCa;
use crate::local::SAMPLE_CRM_SCHEMA;
use crate::model::event::EventType;
use crate::pg::db::Db;
use crate::security::secrets::SecretBox;
use crate::security::ssrf::AddressPolicy;

const ACCOUNT_A: Uuid = Uuid::from_u128(0x0a0a_0000_0000_4000_8000_0000_0000_0001);
const ACCOUNT_B: Uuid = Uuid::from_u128(0x0b0b_0000_0000_4000_8000_0000_0000_0002);

/// walhook's own warnings only: not the client library's server notices (`NOTICE: schema …
/// already exists`), nor the pool's reconnect warnings. `tokio_postgres` is named so that
/// `init_logging` does not add its default `tokio_postgres=info`.
const DEMO_LOG_FILTER: &str = "off,walhook=warn,tokio_postgres=off";

/// Runs the tour; with `stay`, keeps streaming until Ctrl-C.
pub async fn run(stay: bool) -> anyhow::Result<()> {
    println!("walhook demo: starting a throwaway PostgreSQL (wal_level = logical)…");
    let cluster = tokio::task::spawn_blocking(|| TempCluster::start(&ClusterOptions::default())).await??;
    let url = cluster.create_database("driftwood").await?;
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    let conn = tokio::spawn(conn);
    client.batch_execute(SAMPLE_CRM_SCHEMA).await.context("loading the sample CRM schema")?;
    println!(
        "  PostgreSQL on 127.0.0.1:{} with the sample Driftwood CRM schema (server log: {}, removed with the cluster)",
        cluster.port(),
        cluster.log_path().display()
    );

    let ca = LocalCa::generate()?;
    let dir = tempfile::tempdir()?;
    let ca_path = ca.write_ca_pem(dir.path())?;
    let receiver = Receiver::start(&ca).await?;
    println!("  HTTPS receiver on {} (trusts walhook's throwaway CA)", receiver.url(""));

    let (api_port, metrics_port) = (super::port::free()?, super::port::free()?);
    let cfg = Config::from_toml(&format!(
        "[database]\nurl = \"{url}\"\n\
         [api]\nlisten = \"127.0.0.1:{api_port}\"\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\
         [replication]\nslot = \"walhook_demo\"\npublication = \"walhook_demo\"\n\
         [dispatch]\nallowed_cidrs = [\"127.0.0.0/8\"]\nca_certs = [\"{}\"]\nretry_schedule = [\"1s\", \"5s\"]\n\
         [log]\nlevel = \"{DEMO_LOG_FILTER}\"\n",
        ca_path.display()
    ))?;
    crate::ops::logging::init_logging(&cfg);
    let db = Db::new(&cfg.database)?;
    crate::app::migrate(&db, &cfg).await?;
    println!("  migrated: schema walhook, publication and slot walhook_demo, REPLICA IDENTITY FULL on the CRM tables");

    let endpoints = Endpoints::new(
        db.clone(),
        SecretBox::new(None)?,
        AddressPolicy::new(cfg.dispatch.allowed_cidrs.clone()),
        cfg.database.crm_schema.as_str(),
    );
    let caller = Caller { account_id: ACCOUNT_A, user_id: Uuid::new_v4() };
    let (endpoint, secret) = endpoints
        .create(
            caller,
            NewEndpoint {
                url: Some(receiver.url("driftwood-hooks")),
                description: Some("walhook demo receiver".into()),
                events: Some(EventType::ALL.iter().map(|e| e.name().to_owned()).collect()),
                ..Default::default()
            },
        )
        .await?;
    receiver.set_secret("driftwood-hooks", secret.expose());
    println!("  endpoint {} for account {ACCOUNT_A}, secret {}…", endpoint.id, secret.prefix());

    let shutdown = CancellationToken::new();
    let app = tokio::spawn(crate::app::run(Arc::new(cfg), shutdown.clone()));
    let mut feed = receiver.subscribe();
    let printer = tokio::spawn(async move {
        while let Some(r) = feed.recv().await {
            print_webhook(&r);
        }
    });
    wait_ready(metrics_port).await?;

    println!("\nwriting to the CRM (account A, plus one row of account B that must not arrive):\n");
    client
        .batch_execute(&format!(
            "INSERT INTO companies (id, account_id, name, domain, tags, custom_fields) VALUES \
               ('11111111-1111-4111-8111-111111111111', '{ACCOUNT_A}', 'Acme Corp', 'acme.example', '{{b2b,\"key account\"}}', '{{\"tier\": \"gold\"}}');
             INSERT INTO contacts (id, account_id, company_id, first_name, last_name, email, tags, custom_fields, birthday, lifetime_value) VALUES \
               ('22222222-2222-4222-8222-222222222222', '{ACCOUNT_A}', '11111111-1111-4111-8111-111111111111', 'Jane', 'Smith', 'jane@acme.example', '{{vip}}', '{{\"source\": \"demo\"}}', '1990-04-01', 1234.50);
             UPDATE contacts SET title = 'CTO', updated_at = now() WHERE id = '22222222-2222-4222-8222-222222222222';
             INSERT INTO activities (account_id, contact_id, kind, subject, due_date) VALUES \
               ('{ACCOUNT_A}', '22222222-2222-4222-8222-222222222222', 'call', 'Intro call', current_date + 1);
             INSERT INTO projects (account_id, company_id, name, budget, start_date) VALUES \
               ('{ACCOUNT_A}', '11111111-1111-4111-8111-111111111111', 'Onboarding', 25000.00, current_date);
             INSERT INTO contacts (account_id, first_name, last_name) VALUES ('{ACCOUNT_B}', 'Other', 'Tenant');
             DELETE FROM contacts WHERE id = '22222222-2222-4222-8222-222222222222';"
        ))
        .await?;
    let expected = 6;
    let got = receiver.wait_until(Duration::from_secs(30), |r| r.len() >= expected).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // let a stray extra one show up
    let received = receiver.received();
    let verified = received.iter().filter(|r| r.verified).count();
    let foreign = received.iter().filter(|r| r.json()["data"]["account_id"] == ACCOUNT_B.to_string()).count();
    println!("\n{} webhooks received, {verified} with a valid signature, {foreign} from account B", received.len());
    if stay {
        println!(
            "\nstill streaming: write to postgres://postgres@127.0.0.1:{}/driftwood and watch; Ctrl-C to stop",
            cluster.port()
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    shutdown.cancel();
    let _ = app.await;
    printer.abort();
    // Every connection closes before the cluster stops, so none is cut off by its shutdown.
    drop(endpoints);
    drop(db);
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    drop(cluster);
    if got.is_err() || verified != received.len() || foreign != 0 {
        bail!("the demo did not see the expected {expected} verified webhooks");
    }
    println!("done: the throwaway cluster is gone.");
    Ok(())
}

fn print_webhook(r: &Received) {
    let body = r.json();
    let mark = if r.verified { "✓ signature ok" } else { "✗ BAD SIGNATURE" };
    println!(
        "  {mark}  {:<17} webhook-id {}\n      {}",
        body["event"].as_str().unwrap_or("?"),
        r.webhook_id,
        String::from_utf8_lossy(&r.body)
    );
}

/// Waits, as an operator's probe does, until `/readyz` on `metrics_port` says walhook is ready.
async fn wait_ready(metrics_port: u16) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let probe = || async {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", metrics_port)).await?;
        conn.write_all(b"GET /readyz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await?;
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await?;
        Ok::<bool, std::io::Error>(answer.starts_with(b"HTTP/1.1 200"))
    };
    loop {
        if matches!(tokio::time::timeout(Duration::from_secs(2), probe()).await, Ok(Ok(true))) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("walhook was not ready within 30 s (http://127.0.0.1:{metrics_port}/readyz)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
