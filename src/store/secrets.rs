//! Signing secrets stored plain before an encryption key was configured, or sealed before they
//! were bound to their endpoint, sealed (again) in place: the current secret and a rotated-out
//! one alike.
//!
//! What must hold: a row is replaced only if it still holds the value read, so concurrent
//! replicas and updates never lose a write; no error here carries a secret.

use uuid::Uuid;

use crate::pg::db::{Db, DbError};
use crate::security::secrets::{SecretBox, ENCRYPTED_PREFIX};

/// Why stored secrets could not be re-encrypted.
#[derive(Debug, thiserror::Error)]
pub enum ResealError {
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// A stored secret cannot be read (it is named by endpoint, never shown).
    #[error("endpoint {0}: {1}")]
    Unreadable(Uuid, crate::security::secrets::SecretError),
}

impl From<tokio_postgres::Error> for ResealError {
    fn from(e: tokio_postgres::Error) -> Self {
        ResealError::Db(DbError::Postgres(e))
    }
}

/// Plain secrets re-encrypted per statement batch.
const RESEAL_BATCH: i64 = 500;

/// Seals every signing secret not in the current form (stored plain, or sealed unbound) (all
/// of them, or only endpoint `only` = (id, account)); returns how many were sealed. Nothing to
/// do without a key. Each row is replaced only if it still holds the value read, so concurrent
/// replicas and updates never lose a write; `updated_at` does not move (nothing the customer
/// sees changed).
pub async fn reseal_plain(db: &Db, secrets: &SecretBox, only: Option<(Uuid, Uuid)>) -> Result<u64, ResealError> {
    if !secrets.encrypts() {
        return Ok(0);
    }
    let client = db.get().await?;
    let (id, account) = (only.map(|o| o.0), only.map(|o| o.1));
    let mut sealed = 0;
    loop {
        let rows = client
            .query(
                "SELECT id, secret, previous_secret FROM walhook.endpoints \
                 WHERE (left(secret, 7) <> $1 OR left(previous_secret, 7) <> $1) \
                   AND ($2::uuid IS NULL OR (id = $2 AND account_id = $3)) ORDER BY id LIMIT $4",
                &[&ENCRYPTED_PREFIX, &id, &account, &RESEAL_BATCH],
            )
            .await?;
        let mut changed = 0;
        for row in &rows {
            let (ep, stored, previous): (Uuid, String, Option<String>) = (row.get(0), row.get(1), row.get(2));
            let reseal = |stored: &str| -> Result<String, ResealError> {
                if secrets.is_current(stored) {
                    return Ok(stored.to_owned());
                }
                let secret = secrets.open(stored, ep).map_err(|e| ResealError::Unreadable(ep, e))?;
                Ok(secrets.seal(&secret, ep))
            };
            let sealed = reseal(&stored)?;
            let sealed_previous = previous.as_deref().map(reseal).transpose()?;
            changed += client
                .execute(
                    "UPDATE walhook.endpoints SET secret = $3, previous_secret = $5 \
                     WHERE id = $1 AND secret = $2 AND previous_secret IS NOT DISTINCT FROM $4",
                    &[&ep, &stored, &sealed, &previous, &sealed_previous],
                )
                .await?;
        }
        sealed += changed;
        if (rows.len() as i64) < RESEAL_BATCH {
            return Ok(sealed);
        }
    }
}
