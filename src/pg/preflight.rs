//! Start-up checks: everything `walhook run` needs from the database, reported together,
//! each with what to change.
//!
//! What must hold (docs/architecture.md, invariant 8): walhook does not start streaming when a CRM table's deletes
//! would lack `account_id`, when `wal_level` is not logical, when a table or the publication
//! is missing, when the schema is older than this build, or when the role lacks privileges on
//! walhook's schema (reported as such, with the GRANT to run, never as an old schema). The
//! catalog checks ([`catalog_problems`]) are also re-run while walhook streams (`slot::watch`),
//! because a table dropped from the publication or a replica identity changed by hand
//! silently loses changes.

use crate::config::Config;
use crate::model::event::CRM_TABLES;
use crate::pg::catalog::{self, ENDPOINTS_TABLE};
use crate::pg::db::{Db, DbError};
use crate::pg::grants;
use crate::pg::migrate;
use tokio_postgres::error::SqlState;
use tokio_postgres::GenericClient;

/// Why walhook cannot start.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// No connection for the checks could be had.
    #[error(transparent)]
    Db(#[from] DbError),
    /// A check's query failed: which check, and the database's error. Nothing is concluded
    /// from a check that could not run (an unreadable version is not an old schema).
    #[error("preflight failed while {step}: {cause}")]
    Query {
        /// What the failed query was for.
        step: &'static str,
        /// The database's error.
        cause: DbError,
    },
    /// One or more prerequisites are not met; each line says what to change.
    #[error("the database is not ready for walhook:\n  - {}", .0.join("\n  - "))]
    NotReady(Vec<String>),
}

/// Labels a failed query of a check with what it was for.
fn failed<E: Into<DbError>>(step: &'static str) -> impl FnOnce(E) -> PreflightError {
    move |e| PreflightError::Query { step, cause: e.into() }
}

/// Runs every check; `Ok` when streaming may start.
pub async fn check(db: &Db, cfg: &Config) -> Result<(), PreflightError> {
    let client = db.get().await?;
    let mut problems = Vec::new();

    let wal_level: String = client.query_one("SHOW wal_level", &[]).await.map_err(failed("reading wal_level"))?.get(0);
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
            .await
            .map_err(failed("reading the role's REPLICATION attribute"))?;
        (r.get(0), r.get(1))
    };
    if !can_replicate {
        problems.push(format!("role {user} cannot open a replication stream: ALTER ROLE {user} REPLICATION"));
    }

    problems.extend(schema_access(&**client, &user).await?);

    let catalog =
        catalog_problems(&**client, cfg).await.map_err(failed("inspecting the CRM tables and the publication"))?;
    problems.extend(catalog.into_iter().map(|p| p.message));

    if problems.is_empty() {
        failover_advice(&**client, cfg).await;
        Ok(())
    } else {
        Err(PreflightError::NotReady(problems))
    }
}

/// Logs what a safe database failover still needs (a WARN each): a database without a standby
/// is valid, so none of it stops walhook.
async fn failover_advice(client: &impl GenericClient, cfg: &Config) {
    let slot = cfg.replication.slot.as_str();
    match crate::pg::failover::inspect(client, slot).await {
        Ok(view) => {
            for line in view.notes(slot) {
                tracing::info!(check = "failover", "{line}");
            }
            for line in view.advice(slot) {
                tracing::warn!(check = "failover", "{line}");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not read the failover settings"),
    }
}

/// walhook's own schema as `user` sees it: the privileges `walhook run` needs, then the
/// schema's version. Privileges come first: without them the version cannot be read, and a
/// permission problem must be reported as one, with the GRANT that fixes it, not as an old
/// schema.
async fn schema_access(client: &impl GenericClient, user: &str) -> Result<Vec<String>, PreflightError> {
    let privileges = "reading the role's privileges on schema walhook";
    let lacking = grants::missing(client).await.map_err(failed(privileges))?;
    if !lacking.is_empty() {
        return Ok(vec![format!(
            "role {user} lacks {} (schema walhook belongs to the role that ran `walhook migrate`): run \
             `walhook migrate` again as that role with database.runtime_role = \"{user}\", or, as that role: {}",
            lacking.join(", "),
            grants::grant_sql(client, user).await.map_err(failed(privileges))?
        )]);
    }
    // The table's name is resolved when a statement is parsed, so look it up first.
    let reading_version = "reading walhook's schema version";
    let exists: bool = client
        .query_one("SELECT to_regclass('walhook.schema_migrations') IS NOT NULL", &[])
        .await
        .map_err(failed(reading_version))?
        .get(0);
    let version: i32 = if !exists {
        0
    } else {
        match client.query_one("SELECT max(version) FROM walhook.schema_migrations", &[]).await {
            Ok(row) => row.get::<_, Option<i32>>(0).unwrap_or(0),
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                return Ok(vec![format!(
                    "role {user} may not read walhook's schema version ({}): as the schema's owner, {}",
                    crate::pg::db::error_chain(&e),
                    grants::grant_sql(client, user).await.map_err(failed(privileges))?
                )]);
            }
            Err(e) => return Err(failed(reading_version)(e)),
        }
    };
    let latest = migrate::latest_version();
    if version < latest {
        return Ok(vec![format!(
            "walhook's schema is at version {version} and this build needs {latest}: run `walhook migrate --config FILE`"
        )]);
    }
    Ok(Vec::new())
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
            let wanted: Vec<String> = wanted.collect();
            for t in wanted.iter().filter(|t| !tables.contains(t)) {
                add(
                    Check::Publication,
                    format!(
                        "publication {publication} does not include {t}: run `walhook migrate` or \
                         ALTER PUBLICATION {publication} ADD TABLE {t}"
                    ),
                );
            }
            if let Some(shape) = catalog::publication_shape(client, publication).await? {
                if !shape.missing_actions.is_empty() {
                    add(
                        Check::Publication,
                        format!(
                            "publication {publication} does not publish {}: those changes produce no webhooks; \
                             run `walhook migrate` or ALTER PUBLICATION {publication} SET (publish = 'insert, \
                             update, delete, truncate')",
                            shape.missing_actions.join(" and ")
                        ),
                    );
                }
                let filtered = |list: &[String], what: &str| {
                    list.iter()
                        .filter(|t| wanted.contains(t))
                        .map(|t| {
                            format!(
                                "publication {publication} has a {what} on {t}: rows or columns it leaves out \
                                 produce no webhooks or incomplete ones; ALTER PUBLICATION {publication} SET TABLE \
                                 with every table listed plainly, or run `walhook migrate`"
                            )
                        })
                        .collect::<Vec<_>>()
                };
                for m in filtered(&shape.row_filtered, "row filter") {
                    add(Check::Publication, m);
                }
                for m in filtered(&shape.column_listed, "column list") {
                    add(Check::Publication, m);
                }
            }
        }
    }
    Ok(problems)
}
