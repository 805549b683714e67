//! What walhook needs to know about the database's catalog: the CRM tables it publishes and
//! whether their deletes still carry `account_id`.
//!
//! What must hold: walhook never creates or alters a CRM table's columns; the only things it
//! inspects here are existence, the `id`/`account_id` columns and the replica identity.

use tokio_postgres::GenericClient;

use crate::model::event::CRM_TABLES;
use crate::pg::db::DbError;

/// walhook's endpoint table, published with the CRM tables so routing sees endpoint changes
/// in LSN order.
pub const ENDPOINTS_TABLE: (&str, &str) = ("walhook", "endpoints");

/// What the catalog says about one CRM table.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// Table name, without schema.
    pub name: String,
    /// Whether the table exists.
    pub exists: bool,
    /// Whether it has an `id` column.
    pub has_id: bool,
    /// Whether it has an `account_id` column.
    pub has_account_id: bool,
    /// `d` default, `f` full, `i` index, `n` nothing.
    pub replica_identity: char,
    /// Columns of the replica identity key (for `d` and `i`).
    pub identity_columns: Vec<String>,
}

impl TableInfo {
    /// Whether a delete on this table is written to WAL with `account_id`.
    pub fn deletes_keep_account_id(&self) -> bool {
        match self.replica_identity {
            'f' => true,
            'd' | 'i' => self.identity_columns.iter().any(|c| c == "account_id"),
            _ => false,
        }
    }

    /// The replica identity in words, for messages.
    pub fn identity_words(&self) -> String {
        match self.replica_identity {
            'f' => "REPLICA IDENTITY FULL".into(),
            'n' => "REPLICA IDENTITY NOTHING".into(),
            'd' if self.identity_columns.is_empty() => "REPLICA IDENTITY DEFAULT without a primary key".into(),
            'd' => format!("REPLICA IDENTITY DEFAULT (primary key {})", self.identity_columns.join(", ")),
            _ => format!("REPLICA IDENTITY USING INDEX ({})", self.identity_columns.join(", ")),
        }
    }
}

/// Inspects the four CRM tables in `schema`.
pub async fn inspect_crm_tables(client: &impl GenericClient, schema: &str) -> Result<Vec<TableInfo>, DbError> {
    let rows = client
        .query(
            "SELECT t.name, c.oid IS NOT NULL, \
                    COALESCE(c.relreplident::text, 'n'), \
                    EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'id' AND NOT a.attisdropped), \
                    EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'account_id' AND NOT a.attisdropped), \
                    COALESCE((SELECT array_agg(a.attname::text ORDER BY a.attnum) \
                      FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                      WHERE i.indrelid = c.oid AND CASE c.relreplident WHEN 'd' THEN i.indisprimary \
                                                                       WHEN 'i' THEN i.indisreplident ELSE false END), '{}') \
             FROM unnest($2::text[]) AS t(name) \
             LEFT JOIN pg_namespace n ON n.nspname = $1 \
             LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.name AND c.relkind IN ('r', 'p')",
            &[&schema, &CRM_TABLES.to_vec()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TableInfo {
            name: r.get(0),
            exists: r.get(1),
            replica_identity: r.get::<_, String>(2).chars().next().unwrap_or('n'),
            has_id: r.get(3),
            has_account_id: r.get(4),
            identity_columns: r.get(5),
        })
        .collect())
}

/// Tables (as `schema.name`) in `publication`; empty when it does not exist.
pub async fn published_tables(client: &impl GenericClient, publication: &str) -> Result<Option<Vec<String>>, DbError> {
    let exists = client.query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication]).await?.is_some();
    if !exists {
        return Ok(None);
    }
    let rows = client
        .query("SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1", &[&publication])
        .await?;
    Ok(Some(rows.iter().map(|r| r.get(0)).collect()))
}

/// How a publication publishes: which actions, and the tables it filters (a row filter or a
/// column list, PostgreSQL 15+) among the ones it holds.
#[derive(Debug, Default)]
pub struct PublicationShape {
    /// Actions among insert, update and delete that it does not publish.
    pub missing_actions: Vec<&'static str>,
    /// `schema.table` with a row filter.
    pub row_filtered: Vec<String>,
    /// `schema.table` with a column list.
    pub column_listed: Vec<String>,
}

/// The shape of `publication`; `None` when it does not exist. Works on servers without row
/// filters or column lists (their columns are read through `to_jsonb`).
pub async fn publication_shape(
    client: &impl GenericClient,
    publication: &str,
) -> Result<Option<PublicationShape>, DbError> {
    let Some(p) = client
        .query_opt("SELECT pubinsert, pubupdate, pubdelete FROM pg_publication WHERE pubname = $1", &[&publication])
        .await?
    else {
        return Ok(None);
    };
    let mut shape = PublicationShape::default();
    for (i, action) in ["insert", "update", "delete"].into_iter().enumerate() {
        if !p.get::<_, bool>(i) {
            shape.missing_actions.push(action);
        }
    }
    let rows = client
        .query(
            "SELECT n.nspname || '.' || c.relname, to_jsonb(pr) ->> 'prqual' IS NOT NULL, \
                    to_jsonb(pr) ->> 'prattrs' IS NOT NULL \
             FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid \
             JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE p.pubname = $1 ORDER BY 1",
            &[&publication],
        )
        .await?;
    for r in rows {
        let table: String = r.get(0);
        if r.get::<_, bool>(1) {
            shape.row_filtered.push(table.clone());
        }
        if r.get::<_, bool>(2) {
            shape.column_listed.push(table);
        }
    }
    Ok(Some(shape))
}
