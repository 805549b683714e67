//! Nothing is lost: walhook killed with SIGKILL in the middle of a load, then restarted,
//! delivers every committed change, and every copy of one delivery carries one webhook-id.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::common::{wait_for, wait_for_keys, Env, Readiness, ACCOUNT_A};

const A: &str = "aaaa0000-0000-4000-8000-000000000001";

/// Writes `n` single-row transactions (an insert, and every third row an update) on its own
/// connection; returns the ids written.
async fn load(url: String, n: usize) -> Vec<String> {
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("60000000-0000-4000-8000-{i:012}");
        client
            .batch_execute(&format!(
                "INSERT INTO contacts (id, account_id, first_name) VALUES ('{id}', '{A}', 'load{i}')"
            ))
            .await
            .unwrap();
        if i % 3 == 0 {
            client.batch_execute(&format!("UPDATE contacts SET last_name = 'u' WHERE id = '{id}'")).await.unwrap();
        }
        ids.push(id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_then_restart_loses_nothing() {
    let env = Env::new("sigkill_mid_load").await;
    env.endpoint(ACCOUNT_A, "hook", &["contact.created", "contact.updated"]).await;
    let mut first = env.spawn_binary("");
    env.ready(Readiness::Streaming).await;
    let n = 1500;
    let writer = tokio::spawn(load(env.url.clone(), n));
    // Kill it while changes are flowing: some delivered, some in flight, most not yet read.
    env.receiver.wait_until(Duration::from_secs(60), |r| r.len() >= 200).await.expect("load is flowing");
    first.kill9();
    let seen_at_kill = env.receiver.count();
    let mut second = env.spawn_binary("");
    let ids = writer.await.unwrap();
    let expected: HashSet<(String, String)> = ids
        .iter()
        .enumerate()
        .flat_map(|(i, id)| {
            let mut v = vec![("contact.created".to_string(), id.clone())];
            if i % 3 == 0 {
                v.push(("contact.updated".to_string(), id.clone()));
            }
            v
        })
        .collect();
    let key = |r: &walhook::local::receiver::Received| {
        let b = r.json();
        (b["event"].as_str().unwrap_or_default().to_string(), b["data"]["id"].as_str().unwrap_or_default().to_string())
    };
    let got = wait_for_keys(&env.receiver, &expected, key, &second).await;
    let seen: HashSet<_> = got.iter().map(key).collect();
    let extra: Vec<_> = seen.difference(&expected).take(5).collect();
    assert!(extra.is_empty(), "unexpected webhooks: {extra:?}");
    assert_eq!(seen, expected, "every committed change arrives");
    assert!(got.iter().all(|r| r.verified));
    // Duplicates are allowed (at-least-once) but each change keeps one webhook-id.
    let mut ids_per_change: HashMap<(String, String), HashSet<String>> = HashMap::new();
    for r in &got {
        ids_per_change.entry(key(r)).or_default().insert(r.webhook_id.clone());
    }
    assert!(ids_per_change.values().all(|s| s.len() == 1), "a replayed change keeps its webhook-id");
    assert!(seen_at_kill < expected.len(), "the kill happened mid-load");
    // The database agrees: one delivery row per change, all delivered.
    let q = "SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'";
    wait_for(Duration::from_secs(20), || async { env.scalar_i64(q).await == expected.len() as i64 }).await;
    assert_eq!(env.scalar_i64("SELECT count(*) FROM walhook.deliveries").await, expected.len() as i64);
    second.sigterm();
    let status = second.wait_exit(Duration::from_secs(30)).await.expect("exits after SIGTERM");
    assert!(status.success(), "graceful exit: {status:?}\n{}", second.log_text());
}
