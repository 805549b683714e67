//! Reading one backfill chunk from a CRM table, between the low watermark (written first)
//! and the high one (written by the runner once the chunk is handed to the stream).
//!
//! What must hold:
//! - One short REPEATABLE READ, READ ONLY transaction per chunk: at most `backfill.chunk_size`
//!   rows of one account, in key order after the last key sent, fetched through a cursor
//!   until their bodies reach the byte cap (a quarter of `dispatch.memory_limit`, at least
//!   one row), so large rows are neither held nor read beyond it; no snapshot outlives it.
//! - The read starts after the low watermark is written, and the transactions its snapshot
//!   could not see that had committed by the time of the check are named in the chunk, after
//!   the WAL is flushed past the low watermark (so one whose commit record came before it has
//!   finished flushing and shows as committed): [`super::window`] reads the chunk again if the
//!   stream read such a transaction before the low watermark.
//! - Rows are written as the stream writes them: the columns pgoutput sends (not dropped, not
//!   generated), in table order, each value's text under the stream's session settings
//!   (`DateStyle`, `TimeZone`, `IntervalStyle`, `extra_float_digits`), encoded by the
//!   stream's decoder.
//! - Only rows of the backfill's account are read, and a row whose decoded account differs is
//!   never handed on.

use bytes::Bytes;
use tokio_postgres::{GenericClient, SimpleQueryMessage, SimpleQueryRow};
use uuid::Uuid;

use super::error::BackfillError;
use super::window::{ChunkRow, LOW};
use crate::model::event::Table;
use crate::pg::db::{Db, DbError};
use crate::source::decode::Decoder;
use crate::source::pgoutput::{Column, Datum, Relation, Tuple};

/// `pg_type` OID of `uuid`.
const UUID_OID: u32 = 2950;
/// Rows fetched first from a chunk's cursor; later fetches are sized by the rows seen.
const FIRST_FETCH: usize = 8;
/// The most rows one fetch asks for.
const MAX_FETCH: usize = 1000;
/// How long to wait for the WAL to be flushed past the low watermark before checking.
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A chunk as read.
#[derive(Debug)]
pub struct Read {
    /// The rows, in key order.
    pub rows: Vec<ChunkRow>,
    /// The key of the last row read (`None`: the table has no more rows of the account).
    pub last_key: Option<Uuid>,
    /// When it was read (microseconds since the Unix epoch).
    pub read_at_us: i64,
    /// Transactions the snapshot could not see that had committed when checked.
    pub committed_unseen: Vec<u32>,
}

/// Reads chunks of the CRM tables in `schema`.
pub struct Reader {
    schema: String,
    decoder: Decoder,
}

fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Reader {
    /// A reader of the CRM tables in `schema`.
    pub fn new(schema: &str) -> Reader {
        Reader { schema: schema.to_owned(), decoder: Decoder::new(schema) }
    }

    /// The table as pgoutput describes it (looked up again for every chunk: a column added
    /// meanwhile is in the next chunk, as in the stream).
    async fn relation(&mut self, client: &impl GenericClient, table: Table) -> Result<Relation, BackfillError> {
        let rows = client
            .query(
                "SELECT c.oid, a.attname::text, a.atttypid, a.atttypmod FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN pg_attribute a ON a.attrelid = c.oid \
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
                   AND a.attgenerated = '' ORDER BY a.attnum",
                &[&self.schema, &table.name()],
            )
            .await
            .map_err(DbError::from)?;
        let Some(first) = rows.first() else {
            return Err(BackfillError::Table(format!("table {}.{} does not exist", self.schema, table.name())));
        };
        let columns: Vec<Column> =
            rows.iter().map(|r| Column { flags: 0, name: r.get(1), type_oid: r.get(2), type_mod: r.get(3) }).collect();
        for needed in ["id", "account_id"] {
            if !columns.iter().any(|c| c.name == needed) {
                return Err(BackfillError::Table(format!(
                    "table {}.{} has no {needed} column",
                    self.schema,
                    table.name()
                )));
            }
        }
        // Chunks follow the key in uuid order (the CRM's keys are uuids).
        if !columns.iter().any(|c| c.name == "id" && c.type_oid == UUID_OID) {
            return Err(BackfillError::Table(format!(
                "table {}.{}: its id column is not a uuid, and a backfill reads in uuid key order",
                self.schema,
                table.name()
            )));
        }
        let rel = Relation {
            id: first.get(0),
            namespace: self.schema.clone(),
            name: table.name().to_owned(),
            replica_identity: b'f',
            columns,
        };
        let unknown = self.decoder.unknown_types(&rel);
        if !unknown.is_empty() {
            self.decoder.resolve_types(client, unknown).await.map_err(|e| BackfillError::Types(e.to_string()))?;
        }
        self.decoder.add_relation(rel.clone());
        Ok(rel)
    }

    /// Rows of `account` in `table` after `after`, about `limit` of them and up to `byte_cap`
    /// bytes of bodies (at least one row), read after the low watermark of `token`.
    pub async fn chunk(
        &mut self,
        db: &Db,
        (table, account, after): (Table, Uuid, Option<Uuid>),
        (limit, byte_cap): (usize, usize),
        token: Uuid,
    ) -> Result<Read, BackfillError> {
        let mut client = db.get().await?;
        let rel = self.relation(&**client, table).await?;
        let low: String = client
            .query_one("SELECT pg_logical_emit_message(false, $1, $2)::text", &[&LOW, &token.to_string()])
            .await
            .map_err(DbError::from)?
            .get(0);
        // The simple query protocol: values come back as their types' output functions write
        // them, exactly as pgoutput sends them (a cast to text differs: `true::text` is
        // `true`, not `t`; `inet::text` adds the mask). Its literals are a UUID and a count.
        let select = format!(
            "SELECT {} FROM {}.{} WHERE account_id = '{account}' {} ORDER BY id LIMIT {limit}",
            rel.columns.iter().map(|c| quoted(&c.name)).collect::<Vec<_>>().join(", "),
            quoted(&self.schema),
            quoted(table.name()),
            after.map(|k| format!("AND id > '{k}'")).unwrap_or_default(),
        );
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(DbError::from)?;
        tx.batch_execute(
            "SET LOCAL DateStyle = ISO; SET LOCAL TimeZone = UTC; SET LOCAL IntervalStyle = postgres; \
             SET LOCAL extra_float_digits = 3",
        )
        .await
        .map_err(DbError::from)?;
        let read_at = chrono::Utc::now();
        let timestamp = read_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        // A cursor, fetched a few rows at a time: rows past `byte_cap` are never read (nor
        // held), so a chunk of large rows costs its cap, not `chunk_size` rows.
        tx.batch_execute(&format!("DECLARE walhook_backfill NO SCROLL CURSOR FOR {select}"))
            .await
            .map_err(DbError::from)?;
        let id_col = rel.columns.iter().position(|c| c.name == "id").expect("checked above");
        let (mut out, mut bytes, mut last_key, mut fetched) = (Vec::new(), 0usize, None, 0usize);
        let mut batch = FIRST_FETCH.min(limit);
        'fetch: while batch > 0 {
            let rows: Vec<SimpleQueryRow> = tx
                .simple_query(&format!("FETCH {batch} FROM walhook_backfill"))
                .await
                .map_err(DbError::from)?
                .into_iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(row) => Some(row),
                    _ => None,
                })
                .collect();
            if rows.is_empty() {
                break;
            }
            fetched += rows.len();
            for row in &rows {
                let tuple = Tuple(
                    (0..rel.columns.len())
                        .map(|i| row.get(i).map_or(Datum::Null, |t| Datum::Text(Bytes::copy_from_slice(t.as_bytes()))))
                        .collect(),
                );
                let key = row.get(id_col).and_then(|t| Uuid::parse_str(t).ok());
                let Some(change) = self.decoder.backfilled(rel.id, &tuple, &timestamp) else { continue };
                last_key = key;
                if change.account_id != Some(account) {
                    continue; // never another account's row
                }
                bytes += change.body.len();
                out.push(ChunkRow { entity_key: change.entity_key, body: change.body });
                if bytes >= byte_cap {
                    break 'fetch;
                }
            }
            // As many more as the cap has room for, judging by the rows so far.
            let average = (bytes / out.len().max(1)).max(1);
            batch = ((byte_cap - bytes) / average).clamp(1, MAX_FETCH).min(limit - fetched);
        }
        // The WAL flushed past the low watermark: a transaction whose commit record precedes
        // it has stopped waiting for its flush and shows as committed below.
        let flushed_by = tokio::time::Instant::now() + FLUSH_WAIT;
        loop {
            let flushed: bool = tx
                .query_one("SELECT pg_current_wal_flush_lsn() >= $1::text::pg_lsn", &[&low])
                .await
                .map_err(DbError::from)?
                .get(0);
            if flushed || tokio::time::Instant::now() >= flushed_by {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let unseen = tx
            .query(
                "SELECT x::text FROM pg_snapshot_xip(pg_current_snapshot()) x \
                 WHERE pg_xact_status(x) = 'committed'",
                &[],
            )
            .await
            .map_err(DbError::from)?;
        tx.commit().await.map_err(DbError::from)?;
        let committed_unseen = unseen
            .iter()
            .filter_map(|r| r.get::<_, String>(0).parse::<u64>().ok())
            .map(|x| x as u32) // the stream names transactions by their 32-bit xid
            .collect();
        Ok(Read { rows: out, last_key, read_at_us: read_at.timestamp_micros(), committed_unseen })
    }

    /// The account's rows in `tables` now (the backfill's estimate).
    pub async fn count(&self, db: &Db, tables: &[Table], account: Uuid) -> Result<i64, BackfillError> {
        let client = db.get().await?;
        let mut total = 0;
        for t in tables {
            let sql =
                format!("SELECT count(*) FROM {}.{} WHERE account_id = $1", quoted(&self.schema), quoted(t.name()));
            let n: i64 = client.query_one(sql.as_str(), &[&account]).await.map_err(DbError::from)?.get(0);
            total += n;
        }
        Ok(total)
    }
}
