//! What `walhook run` needs on walhook's own schema, said once: `walhook migrate` grants it to
//! `database.runtime_role`, and preflight checks that the role `run` connects as holds it,
//! naming the GRANT statements that would fix what is missing.
//!
//! What must hold: the runtime role gets USAGE on schema `walhook`, SELECT, INSERT, UPDATE and
//! DELETE on walhook's tables (only SELECT on `schema_migrations`, which only migrate writes),
//! SELECT on its views, USAGE and SELECT on its sequences, and nothing more: no CREATE on the
//! schema, no TRUNCATE, no ownership. Tables and views a later migration adds are covered,
//! because the list is read from the catalog after migrating, not written down here.

use tokio_postgres::GenericClient;

use crate::pg::db::DbError;

/// walhook's own schema.
pub const SCHEMA: &str = "walhook";
/// The table only `walhook migrate` writes; the runtime role reads it.
pub const VERSIONS_TABLE: &str = "schema_migrations";
/// What the runtime role may do to rows of walhook's tables.
pub const TABLE_PRIVILEGES: &[&str] = &["SELECT", "INSERT", "UPDATE", "DELETE"];

/// What a relation of schema `walhook` is, for what the runtime role gets on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Table,
    View,
    Sequence,
}

/// Tables, views and sequences of schema `walhook`, as (name, kind), sorted.
async fn relations(client: &impl GenericClient) -> Result<Vec<(String, Kind)>, DbError> {
    let rows = client
        .query(
            "SELECT c.relname::text, c.relkind::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'S') ORDER BY 1",
            &[&SCHEMA],
        )
        .await?;
    let kind = |k: &str| match k {
        "S" => Kind::Sequence,
        "v" => Kind::View,
        _ => Kind::Table,
    };
    Ok(rows.iter().map(|r| (r.get(0), kind(r.get(1)))).collect())
}

/// The statements granting `role` what `walhook run` needs, given walhook's relations.
fn statements(role: &str, relations: &[(String, Kind)]) -> Vec<String> {
    let qualified = |names: Vec<&String>| names.iter().map(|n| format!("{SCHEMA}.{n}")).collect::<Vec<_>>().join(", ");
    let of = |kind: Kind| relations.iter().filter(move |(_, k)| *k == kind).map(|(n, _)| n);
    let tables: Vec<&String> = of(Kind::Table).filter(|n| *n != VERSIONS_TABLE).collect();
    let views: Vec<&String> = of(Kind::View).collect();
    let sequences: Vec<&String> = of(Kind::Sequence).collect();
    let mut out = vec![format!("GRANT USAGE ON SCHEMA {SCHEMA} TO {role}")];
    if !tables.is_empty() {
        out.push(format!("GRANT {} ON {} TO {role}", TABLE_PRIVILEGES.join(", "), qualified(tables)));
    }
    if of(Kind::Table).any(|n| n == VERSIONS_TABLE) {
        out.push(format!("GRANT SELECT ON {SCHEMA}.{VERSIONS_TABLE} TO {role}"));
    }
    if !views.is_empty() {
        out.push(format!("GRANT SELECT ON {} TO {role}", qualified(views)));
    }
    if !sequences.is_empty() {
        out.push(format!("GRANT USAGE, SELECT ON SEQUENCE {} TO {role}", qualified(sequences)));
    }
    out
}

/// The GRANT statements (`;`-separated) that give `role` what `walhook run` needs.
pub async fn grant_sql(client: &impl GenericClient, role: &str) -> Result<String, DbError> {
    Ok(statements(role, &relations(client).await?).join("; "))
}

/// Grants `role` what `walhook run` needs; called by migrate as the schema's owner.
/// Returns the statements it ran.
pub async fn grant(client: &impl GenericClient, role: &str) -> Result<Vec<String>, DbError> {
    let statements = statements(role, &relations(client).await?);
    for statement in &statements {
        client.batch_execute(statement).await?;
    }
    Ok(statements)
}

/// What the current role lacks of what `walhook run` needs, as "USAGE on schema walhook",
/// "INSERT on walhook.deliveries", …; empty when it has everything or the schema is absent
/// (preflight reports an unmigrated database on its own).
pub async fn missing(client: &impl GenericClient) -> Result<Vec<String>, DbError> {
    let schema_usage: Option<bool> = client
        .query_opt(
            "SELECT has_schema_privilege(current_user, n.oid, 'USAGE') FROM pg_namespace n WHERE n.nspname = $1",
            &[&SCHEMA],
        )
        .await?
        .map(|r| r.get(0));
    let Some(schema_usage) = schema_usage else { return Ok(Vec::new()) };
    let mut missing = Vec::new();
    if !schema_usage {
        missing.push(format!("USAGE on schema {SCHEMA}"));
    }
    let rows = client
        .query(
            "SELECT p.privilege || ' on ' || $1 || '.' || c.relname FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             CROSS JOIN unnest($2::text[]) AS p(privilege) \
             WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') \
               AND (c.relname <> $3 OR p.privilege = 'SELECT') \
               AND NOT has_table_privilege(current_user, c.oid, p.privilege) \
             UNION ALL \
             SELECT 'SELECT on ' || $1 || '.' || c.relname FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relkind = 'v' AND NOT has_table_privilege(current_user, c.oid, 'SELECT') \
             UNION ALL \
             SELECT 'USAGE on sequence ' || $1 || '.' || c.relname FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relkind = 'S' AND NOT has_sequence_privilege(current_user, c.oid, 'USAGE')",
            &[&SCHEMA, &TABLE_PRIVILEGES, &VERSIONS_TABLE],
        )
        .await?;
    missing.extend(rows.iter().map(|r| r.get::<_, String>(0)));
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_grant_rows_not_ddl_and_only_reads_of_the_versions_and_views() {
        let relations = [
            ("attempt_log".to_string(), Kind::View),
            ("attempts".to_string(), Kind::Table),
            ("deliveries".to_string(), Kind::Table),
            ("schema_migrations".to_string(), Kind::Table),
            ("some_seq".to_string(), Kind::Sequence),
        ];
        assert_eq!(
            statements("walhook", &relations),
            [
                "GRANT USAGE ON SCHEMA walhook TO walhook",
                "GRANT SELECT, INSERT, UPDATE, DELETE ON walhook.attempts, walhook.deliveries TO walhook",
                "GRANT SELECT ON walhook.schema_migrations TO walhook",
                "GRANT SELECT ON walhook.attempt_log TO walhook",
                "GRANT USAGE, SELECT ON SEQUENCE walhook.some_seq TO walhook",
            ]
        );
    }
}
