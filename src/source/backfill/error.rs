//! Why a backfill step failed, and whether trying again may help.
//!
//! What must hold: a database that cannot be reached is transient (the chunk is read again
//! later); anything else ends the backfill `failed`, with this error as its reason.

use crate::pg::db::DbError;

/// Why a backfill step failed.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// A query failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The table cannot be read as a CRM table.
    #[error("{0}")]
    Table(String),
    /// A column type could not be looked up.
    #[error("looking up column types: {0}")]
    Types(String),
}

impl BackfillError {
    /// Whether reading the chunk again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            BackfillError::Db(e) => e.is_transient(),
            BackfillError::Types(_) => true,
            BackfillError::Table(_) => false,
        }
    }
}
