//! Changed-column filters as customers set them (`update_columns` on `webhooks-create` and
//! `webhooks-update`): read from the request and checked against the catalog.
//!
//! What must hold: a filter names only the four CRM tables, by their names in the CRM, and
//! only columns those tables have now (the database's catalog, in `database.crm_schema`); a
//! refused filter is named in the error (every unknown table or column of it) and changes
//! nothing; `{}` and `null` mean no filter; a table lists at least one column and at most
//! [`MAX_COLUMNS`], duplicates dropped, in the order given.

use std::collections::BTreeMap;

use serde_json::Value;
use tokio_postgres::GenericClient;

use crate::model::columns::UpdateColumns;
use crate::model::event::CRM_TABLES;
use crate::pg::db::DbError;

/// Why a filter was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ColumnsError {
    /// The filter is refused; the message names what is wrong with it.
    #[error("{0}")]
    Invalid(String),
    /// The catalog could not be read.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for ColumnsError {
    fn from(e: tokio_postgres::Error) -> Self {
        ColumnsError::Db(DbError::Postgres(e))
    }
}

fn invalid(msg: impl Into<String>) -> ColumnsError {
    ColumnsError::Invalid(msg.into())
}

/// Most columns one table of a filter may list.
pub const MAX_COLUMNS: usize = 256;

/// The filter `value` describes, checked against the columns the CRM tables of `schema` have
/// (`None`: no filter).
pub async fn check(
    client: &impl GenericClient,
    schema: &str,
    value: &Value,
) -> Result<Option<UpdateColumns>, ColumnsError> {
    let shape = || invalid("update_columns must be an object of CRM table name to a list of column names, or null");
    let tables = match value {
        Value::Null => return Ok(None),
        Value::Object(tables) => tables,
        _ => return Err(shape()),
    };
    let mut filter = BTreeMap::new();
    // Every unknown table and column is named in one answer.
    let (mut unknown_tables, mut unknown_columns) = (Vec::new(), Vec::new());
    for (table, columns) in tables {
        if !CRM_TABLES.contains(&table.as_str()) {
            unknown_tables.push(format!("{:?}", table.chars().take(64).collect::<String>()));
            continue;
        }
        let Value::Array(list) = columns else {
            return Err(invalid(format!("update_columns.{table} must be a list of column names")));
        };
        if list.is_empty() || list.len() > MAX_COLUMNS {
            return Err(invalid(format!("update_columns.{table} must list between 1 and {MAX_COLUMNS} columns")));
        }
        let mut names: Vec<String> = Vec::with_capacity(list.len());
        for c in list {
            let Value::String(name) = c else {
                return Err(invalid(format!("update_columns.{table} must be a list of column names (strings)")));
            };
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        let known = columns_of(client, schema, table).await?;
        let unknown: Vec<String> = names
            .iter()
            .filter(|n| !known.contains(n))
            .map(|n| format!("{:?}", n.chars().take(64).collect::<String>()))
            .collect();
        if !unknown.is_empty() {
            unknown_columns.push(format!(
                "update_columns.{table}: unknown column{} {} (not a column of {schema}.{table})",
                if unknown.len() == 1 { "" } else { "s" },
                unknown.join(", ")
            ));
        }
        filter.insert(table.clone(), names);
    }
    if !unknown_tables.is_empty() {
        unknown_columns.insert(
            0,
            format!(
                "update_columns: unknown table{} {} (the tables are {})",
                if unknown_tables.len() == 1 { "" } else { "s" },
                unknown_tables.join(", "),
                CRM_TABLES.join(", ")
            ),
        );
    }
    if !unknown_columns.is_empty() {
        return Err(invalid(unknown_columns.join("; ")));
    }
    Ok(Some(UpdateColumns(filter)).filter(|f| !f.is_empty()))
}

/// The columns table `table` of `schema` has now (none when it does not exist).
async fn columns_of(client: &impl GenericClient, schema: &str, table: &str) -> Result<Vec<String>, ColumnsError> {
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_attribute a \
               JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&schema, &table],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
