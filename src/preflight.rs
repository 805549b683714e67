//! Start-up checks: everything `walhook run` needs from the database, reported together,
//! each with what to change.
//!
//! What must hold (invariant 8): walhook does not start streaming when a CRM table's deletes
//! would lack `account_id`, when `wal_level` is not logical, when a table or the publication
//! is missing, or when the schema is older than this build. The catalog checks
//! ([`catalog_problems`]) are also re-run while walhook streams (`slot::watch`), because a
//! table dropped from the publication or a replica identity changed by hand silently loses
//! changes.

use tokio_postgres::GenericClient;

use crate::catalog::{self, CRM_TABLES, ENDPOINTS_TABLE};
use crate::config::Config;
use crate::db::{Db, DbError};
use crate::migrate;

/// Why walhook cannot start.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// The checks could not be run.
    #[error(transparent)]
    Db(#[from] DbError),
    /// One or more prerequisites are not met; each line says what to change.
    #[error("the database is not ready for walhook:\n  - {}", .0.join("\n  - "))]
    NotReady(Vec<String>),
}

impl From<tokio_postgres::Error> for PreflightError {
    fn from(e: tokio_postgres::Error) -> Self {
        PreflightError::Db(DbError::Postgres(e))
    }
}

/// Runs every check; `Ok` when streaming may start.
pub async fn check(db: &Db, cfg: &Config) -> Result<(), PreflightError> {
    let client = db.get().await?;
    let mut problems = Vec::new();

    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        problems.push(format!(
            "wal_level is '{wal_level}': set wal_level = logical in postgresql.conf (or the \
             cloud provider's parameter group) and restart PostgreSQL"
        ));
    }
    let (user, can_replicate): (String, bool) = {
        let r = client
            .query_one(
                "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    if !can_replicate {
        problems.push(format!("role {user} cannot open a replication stream: ALTER ROLE {user} REPLICATION"));
    }

    let version: Option<i32> = client
        .query_one(
            "SELECT CASE WHEN to_regclass('walhook.schema_migrations') IS NULL THEN NULL \
             ELSE (SELECT max(version) FROM walhook.schema_migrations) END",
            &[],
        )
        .await
        .ok()
        .and_then(|r| r.get(0));
    let latest = migrate::latest_version();
    if version.unwrap_or(0) < latest {
        problems.push(format!(
            "walhook's schema is at version {} and this build needs {latest}: run `walhook migrate --config FILE`",
            version.unwrap_or(0)
        ));
    }

    problems.extend(catalog_problems(&**client, cfg).await?.into_iter().map(|p| p.message));

    if problems.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::NotReady(problems))
    }
}

/// A prerequisite that can break while walhook runs; the `check` label of
/// `walhook_replication_prerequisite_failing` and the `kind` of its gap rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Check {
    /// A CRM table exists with `id` and `account_id`.
    Table,
    /// A CRM table's deletes carry `account_id`.
    ReplicaIdentity,
    /// The publication holds the CRM tables and `walhook.endpoints`.
    Publication,
}

impl Check {
    /// Every check, in label order.
    pub const ALL: [Check; 3] = [Check::Table, Check::ReplicaIdentity, Check::Publication];

    /// The metric label and gap kind.
    pub fn label(self) -> &'static str {
        match self {
            Check::Table => "table",
            Check::ReplicaIdentity => "replica_identity",
            Check::Publication => "publication",
        }
    }
}

/// One unmet catalog prerequisite, with what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Which check failed.
    pub check: Check,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// The catalog prerequisites (CRM tables, their replica identity, the publication's tables)
/// that are not met; empty when all hold.
pub async fn catalog_problems(client: &impl GenericClient, cfg: &Config) -> Result<Vec<Problem>, DbError> {
    let mut problems = Vec::new();
    let mut add = |check, message| problems.push(Problem { check, message });
    let schema = cfg.database.crm_schema.as_str();
    for t in catalog::inspect_crm_tables(client, schema).await? {
        if !t.exists {
            add(
                Check::Table,
                format!("table {schema}.{} does not exist (check database.url and database.crm_schema)", t.name),
            );
        } else if !t.has_id || !t.has_account_id {
            add(Check::Table, format!("table {schema}.{} needs columns id and account_id", t.name));
        } else if !t.deletes_keep_account_id() {
            add(
                Check::ReplicaIdentity,
                format!(
                    "table {schema}.{} has {}, so its deletes would not carry account_id and could not be \
                     routed: run `walhook migrate` or ALTER TABLE {schema}.{} REPLICA IDENTITY FULL",
                    t.name,
                    t.identity_words(),
                    t.name
                ),
            );
        }
    }

    let publication = cfg.replication.publication.as_str();
    match catalog::published_tables(client, publication).await? {
        None => add(Check::Publication, format!("publication {publication} does not exist: run `walhook migrate`")),
        Some(tables) => {
            let wanted = CRM_TABLES
                .iter()
                .map(|t| format!("{schema}.{t}"))
                .chain(std::iter::once(format!("{}.{}", ENDPOINTS_TABLE.0, ENDPOINTS_TABLE.1)));
            for t in wanted.filter(|t| !tables.contains(t)) {
                add(
                    Check::Publication,
                    format!(
                        "publication {publication} does not include {t}: run `walhook migrate` or \
                         ALTER PUBLICATION {publication} ADD TABLE {t}"
                    ),
                );
            }
        }
    }
    Ok(problems)
}
