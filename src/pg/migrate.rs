//! `walhook migrate`: walhook's schema, the publication and the CRM tables' replica identity.
//!
//! What must hold: running it twice changes nothing the second time; each migration file runs
//! in its own transaction and its version is recorded with it; two processes migrating at
//! once serialise on an advisory lock; CRM tables are never created, only their replica
//! identity is set: FULL on every CRM table not FULL yet (updates then carry the old row, which
//! `previous` in `*.updated` bodies and changed-column filters need), or, with
//! `replication.replica_identity_full = false`, FULL only where deletes would otherwise lose
//! `account_id` (every other table keeps its identity); with
//! `database.runtime_role` set, that role is granted what `walhook run` needs on walhook's
//! schema and nothing more (see [`crate::pg::grants`]).

use crate::config::Config;
use crate::model::event::CRM_TABLES;
use crate::pg::catalog::{self, ENDPOINTS_TABLE};
use crate::pg::db::{Db, DbError};
use crate::pg::grants;

/// Versioned migration files, in order. Never edit a released one; add a new one.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "walhook_schema", include_str!("../../sql/0001_walhook_schema.sql")),
    (2, "drop_unused_index", include_str!("../../sql/0002_drop_unused_index.sql")),
    (3, "routing_versions", include_str!("../../sql/0003_routing_versions.sql")),
    (4, "slot_state", include_str!("../../sql/0004_slot_state.sql")),
    (5, "attempt_kind_payload", include_str!("../../sql/0005_attempt_kind_payload.sql")),
    (6, "slot_ceiling", include_str!("../../sql/0006_slot_ceiling.sql")),
    (7, "recover", include_str!("../../sql/0007_recover.sql")),
    (8, "requeue_order", include_str!("../../sql/0008_requeue_order.sql")),
    (9, "signing_and_columns", include_str!("../../sql/0009_signing_and_columns.sql")),
    (10, "backfill", include_str!("../../sql/0010_backfill.sql")),
    (11, "first_attempt", include_str!("../../sql/0011_first_attempt.sql")),
];

/// The schema version this build expects.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

/// Advisory lock key serialising migrations ("walhook-migrate").
const MIGRATE_LOCK: i64 = 0x7761_6c68_6f6f_6b01;

/// Why migrating stopped.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A statement failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// A migration file failed; nothing of it was applied.
    #[error("migration {version} ({name}) failed: {}", crate::pg::db::error_chain(.cause))]
    Migration {
        /// Version of the failed file.
        version: i32,
        /// Its name.
        name: &'static str,
        /// The database's error.
        cause: tokio_postgres::Error,
    },
    /// The CRM schema is not there; walhook does not create it.
    #[error("{0}")]
    CrmSchema(String),
    /// `database.runtime_role` names a role the database does not have.
    #[error(
        "database.runtime_role: role {0} does not exist; create it first (CREATE ROLE {0} LOGIN REPLICATION …) \
         or unset database.runtime_role"
    )]
    NoRuntimeRole(String),
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(e: tokio_postgres::Error) -> Self {
        MigrateError::Db(DbError::Postgres(e))
    }
}

/// What a migrate run did, for the CLI to print.
#[derive(Debug, Default)]
pub struct MigrateReport {
    /// Versions applied by this run.
    pub applied: Vec<i32>,
    /// Tables whose replica identity was set to FULL.
    pub replica_identity_set: Vec<String>,
    /// Whether the publication was created.
    pub publication_created: bool,
    /// Tables added to an existing publication.
    pub publication_added: Vec<String>,
    /// What was put back on an existing publication (publish actions, filtered tables).
    pub publication_restored: Vec<String>,
    /// GRANT statements run for `database.runtime_role`.
    pub granted: Vec<String>,
}

/// Brings the database to the schema this build expects.
pub async fn migrate(db: &Db, cfg: &Config) -> Result<MigrateReport, MigrateError> {
    let mut client = db.connect().await?;
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK]).await?;
    let result = migrate_locked(&mut client, cfg).await;
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK]).await;
    result
}

async fn migrate_locked(client: &mut tokio_postgres::Client, cfg: &Config) -> Result<MigrateReport, MigrateError> {
    let mut report = MigrateReport::default();
    let schema = cfg.database.crm_schema.as_str();

    // The CRM tables must exist before anything is published; checking first means a wrong
    // database leaves no walhook schema behind.
    let tables = catalog::inspect_crm_tables(client, schema).await?;
    let missing: Vec<String> = tables.iter().filter(|t| !t.exists).map(|t| format!("{schema}.{}", t.name)).collect();
    if !missing.is_empty() {
        return Err(MigrateError::CrmSchema(format!(
            "missing CRM table(s) {}: walhook publishes the Driftwood CRM tables and never \
             creates them; check database.url and database.crm_schema",
            missing.join(", ")
        )));
    }
    for t in &tables {
        if !t.has_id || !t.has_account_id {
            return Err(MigrateError::CrmSchema(format!(
                "table {schema}.{} needs columns id and account_id to be routed",
                t.name
            )));
        }
    }

    // The runtime role must exist before anything changes; migrate grants it nothing when
    // it is the role migrating (it then owns what it creates).
    let grant_to: Option<&str> = match &cfg.database.runtime_role {
        None => None,
        Some(role) => {
            let is_self: bool = client
                .query_opt("SELECT rolname = current_user FROM pg_roles WHERE rolname = $1", &[&role.as_str()])
                .await?
                .ok_or_else(|| MigrateError::NoRuntimeRole(role.to_string()))?
                .get(0);
            (!is_self).then_some(role.as_str())
        }
    };

    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS walhook;
             CREATE TABLE IF NOT EXISTS walhook.schema_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    let done: Vec<i32> =
        client.query("SELECT version FROM walhook.schema_migrations", &[]).await?.iter().map(|r| r.get(0)).collect();
    for &(version, name, sql) in MIGRATIONS {
        if done.contains(&version) {
            continue;
        }
        let tx = client.transaction().await?;
        let applied = async {
            tx.batch_execute(sql).await?;
            tx.execute("INSERT INTO walhook.schema_migrations (version, name) VALUES ($1, $2)", &[&version, &name])
                .await?;
            tx.commit().await
        }
        .await;
        applied.map_err(|cause| MigrateError::Migration { version, name, cause })?;
        tracing::info!(version, name, "applied migration");
        report.applied.push(version);
    }

    let every_table = cfg.replication.replica_identity_full;
    for t in tables.iter().filter(|t| t.replica_identity != 'f') {
        let why = if !t.deletes_keep_account_id() {
            "set REPLICA IDENTITY FULL so deletes keep account_id"
        } else if every_table {
            "set REPLICA IDENTITY FULL so updates carry the old row (replication.replica_identity_full)"
        } else {
            continue;
        };
        client.batch_execute(&format!("ALTER TABLE {schema}.{} REPLICA IDENTITY FULL", t.name)).await?;
        tracing::info!(table = %t.name, was = %t.identity_words(), "{why}");
        report.replica_identity_set.push(t.name.clone());
    }

    let publication = cfg.replication.publication.as_str();
    let wanted: Vec<String> = CRM_TABLES
        .iter()
        .map(|t| format!("{schema}.{t}"))
        .chain(std::iter::once(format!("{}.{}", ENDPOINTS_TABLE.0, ENDPOINTS_TABLE.1)))
        .collect();
    match catalog::published_tables(client, publication).await? {
        None => {
            client
                .batch_execute(&format!(
                    "CREATE PUBLICATION {publication} FOR TABLE {} WITH (publish = 'insert, update, delete, truncate')",
                    wanted.join(", ")
                ))
                .await?;
            report.publication_created = true;
        }
        Some(present) => {
            for table in wanted.iter().filter(|t| !present.contains(t)) {
                client.batch_execute(&format!("ALTER PUBLICATION {publication} ADD TABLE {table}")).await?;
                report.publication_added.push(table.clone());
            }
            // Every change of every column of walhook's tables must be in the stream.
            if let Some(shape) = catalog::publication_shape(client, publication).await? {
                if !shape.missing_actions.is_empty() {
                    client
                        .batch_execute(&format!(
                            "ALTER PUBLICATION {publication} SET (publish = 'insert, update, delete, truncate')"
                        ))
                        .await?;
                    report.publication_restored.push(format!("publish {}", shape.missing_actions.join(", ")));
                }
                let filtered = shape.row_filtered.iter().chain(&shape.column_listed).filter(|t| wanted.contains(t));
                let mut seen = Vec::new();
                for table in filtered {
                    if seen.contains(table) {
                        continue;
                    }
                    seen.push(table.clone());
                    // Dropping and adding the table again, in one transaction, clears its
                    // row filter and column list.
                    client
                        .batch_execute(&format!(
                            "BEGIN; ALTER PUBLICATION {publication} DROP TABLE {table}; \
                             ALTER PUBLICATION {publication} ADD TABLE {table}; COMMIT"
                        ))
                        .await?;
                    report.publication_restored.push(format!("{table} without row filter or column list"));
                }
            }
        }
    }

    if let Some(role) = grant_to {
        report.granted = grants::grant(client, role).await?;
        tracing::info!(role, statements = %report.granted.join("; "), "granted the runtime role what `walhook run` needs");
    }
    Ok(report)
}
