//! Loaders: CRM writes as fast as PostgreSQL takes them (bulk) or at a fixed rate (paced),
//! recording when each COMMIT returned.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use uuid::Uuid;

const TABLES: [&str; 4] = ["contacts", "companies", "activities", "projects"];

/// A row id the benchmark can recognise in a webhook body: phase, number.
pub fn row_id(phase: u8, n: usize) -> String {
    format!("b{phase:07x}-0000-4000-8000-{n:012}")
}

/// The phase and number back from a row id.
pub fn parse_row_id(id: &str) -> Option<(u8, usize)> {
    let phase = u8::from_str_radix(id.get(1..8)?, 16).ok()?;
    let n = id.get(24..)?.parse().ok()?;
    Some((phase, n))
}

/// `INSERT` of one ~0.7 KB row with tags and custom fields into `table`.
fn insert(table: &str, id: &str, account: Uuid, n: usize) -> String {
    let filler = "x".repeat(420);
    let json = format!("'{{\"source\": \"bench\", \"score\": {n}, \"nested\": {{\"a\": [1, 2, 3]}}}}'");
    let tags = format!("ARRAY['vip', 'tier {}', 'q\"uote']", n % 7);
    let (cols, vals) = match table {
        "contacts" => (
            "first_name, last_name, email, title, tags, custom_fields",
            format!("'Ann{n}', '{filler}', 'a{n}@example.com', 'CTO', {tags}, {json}"),
        ),
        "companies" => (
            "name, domain, industry, tags, custom_fields",
            format!("'Acme {n}', 'acme{n}.example', '{filler}', {tags}, {json}"),
        ),
        "activities" => ("subject, body, metadata", format!("'Call {n}', '{filler}', {json}")),
        _ => ("name, status, tags, custom_fields", format!("'{filler}', 'active', {tags}, {json}")),
    };
    format!("INSERT INTO {table} (id, account_id, {cols}) VALUES ('{id}', '{account}', {vals});")
}

/// Writes `txs` transactions of 10 changes (6 inserts, 3 updates, 1 delete) over the four
/// tables, `account_of(tx)` owning each, on `workers` connections. Returns the commit
/// return time of every transaction by its first row number.
pub async fn bulk(
    url: &str,
    phase: u8,
    txs: usize,
    workers: usize,
    account_of: impl Fn(usize) -> Uuid + Send + Sync + 'static,
) -> anyhow::Result<HashMap<usize, SystemTime>> {
    let account_of = Arc::new(account_of);
    let commits = Arc::new(Mutex::new(HashMap::with_capacity(txs)));
    let mut handles = Vec::new();
    for w in 0..workers {
        let (url, account_of, commits) = (url.to_owned(), account_of.clone(), commits.clone());
        handles.push(tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            let mut sql = String::with_capacity(16 * 1024);
            for t in (w..txs).step_by(workers) {
                sql.clear();
                sql.push_str("BEGIN;");
                let table = TABLES[t % 4];
                let acct = account_of(t);
                let ids: Vec<String> = (0..6).map(|k| row_id(phase, t * 10 + k)).collect();
                for (k, id) in ids.iter().enumerate() {
                    sql.push_str(&insert(table, id, acct, t * 10 + k));
                }
                for id in &ids[..3] {
                    sql.push_str(&format!("UPDATE {table} SET updated_at = now() WHERE id = '{id}';"));
                }
                sql.push_str(&format!("DELETE FROM {table} WHERE id = '{}';", ids[5]));
                sql.push_str("COMMIT;");
                client.batch_execute(&sql).await?;
                commits.lock().unwrap().insert(t * 10, SystemTime::now());
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let map = std::mem::take(&mut *commits.lock().unwrap());
    Ok(map)
}

/// Single-change transactions (a contact insert) at `rate` per second for `secs`, for
/// `account`. Returns each row number's commit return time.
pub async fn paced(
    url: &str,
    phase: u8,
    rate: f64,
    secs: f64,
    account: Uuid,
) -> anyhow::Result<HashMap<usize, SystemTime>> {
    let total = (rate * secs) as usize;
    let workers = ((rate / 200.0).ceil() as usize).clamp(1, 8);
    let start = Instant::now() + Duration::from_millis(50);
    let commits = Arc::new(Mutex::new(HashMap::with_capacity(total)));
    let mut handles = Vec::new();
    for w in 0..workers {
        let (url, commits) = (url.to_owned(), commits.clone());
        handles.push(tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            for n in (w..total).step_by(workers) {
                let due = start + Duration::from_secs_f64(n as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                client.batch_execute(&insert("contacts", &row_id(phase, n), account, n)).await?;
                commits.lock().unwrap().insert(n, SystemTime::now());
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let map = std::mem::take(&mut *commits.lock().unwrap());
    Ok(map)
}
