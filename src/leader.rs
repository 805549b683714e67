//! Which replica streams: the holder of a session-level advisory lock named after the slot.
//! The others serve the API and work the outbox, and take over when the holder's session
//! ends (process death closes the connection, which releases the lock).
//!
//! What must hold: at most one walhook process streams a slot at a time; losing the lock's
//! connection ends that process's streaming, and makes its dispatch drop what the session
//! routed, before its walsender goes (another may only stream once that walsender is gone).
//! A process that had to wait for the lock knows it took over, so it waits for the old
//! leader's walsender to end instead of failing on a busy slot.

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::db::{Db, DbError};

/// How often the lock's connection is checked.
const LOST_POLL: Duration = Duration::from_millis(100);

/// The held lock; streaming must stop when `lost` resolves.
pub struct Leadership {
    client: tokio_postgres::Client,
    took_over: bool,
}

impl Leadership {
    /// Resolves when the lock's connection has closed.
    pub async fn lost(&self) {
        while !self.client.is_closed() {
            tokio::time::sleep(LOST_POLL).await;
        }
    }

    /// Whether another process held the lock when this one first asked for it.
    pub fn took_over(&self) -> bool {
        self.took_over
    }
}

fn lock_key(slot: &str) -> i64 {
    let digest = Sha256::digest(format!("walhook:slot:{slot}").as_bytes());
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// Waits until this process holds the slot's lock; `None` on shutdown.
pub async fn acquire(db: &Db, slot: &str, shutdown: &CancellationToken) -> Result<Option<Leadership>, DbError> {
    let key = lock_key(slot);
    let mut announced = false;
    loop {
        let client = db.connect().await?;
        let got: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).await?.get(0);
        if got {
            if announced {
                tracing::info!(slot, "took over replication");
            }
            return Ok(Some(Leadership { client, took_over: announced }));
        }
        if !announced {
            tracing::info!(slot, "another walhook process streams this slot; standing by");
            announced = true;
        }
        drop(client);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
