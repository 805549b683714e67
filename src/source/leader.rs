//! Which replica streams: the holder of a session-level advisory lock named after the slot.
//! The others serve the API and work the outbox, and take over when the holder's session
//! ends (process death closes the connection, which releases the lock).
//!
//! What must hold: at most one walhook process streams a slot at a time; losing the lock's
//! connection ends that process's streaming, and makes its dispatch drop what the session
//! routed, before its walsender goes (another may only stream once that walsender is gone).
//! A process that had to wait for the lock knows it took over, so it waits for the old
//! leader's walsender to end instead of failing on a busy slot.
//!
//! A process can also be frozen (SIGSTOP, a stalled VM) while its lock is taken away; when it
//! resumes, nothing tells it at once. So the lock is held as a [`Tenure`]: renewed only by a
//! round trip on the lock's connection, valid for [`TENURE`] after it, and dispatch starts no
//! attempt outside it. A new holder waits [`TENURE`] after taking the lock, so whatever an old
//! holder still has in memory can no longer be sent by the time the new one streams.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::model::tenure::{Tenure, TENURE};
use crate::ops::status::ReplicationStatus;
use crate::pg::db::{Db, DbError};

/// How often the lock's connection is checked (a round trip renews the tenure).
const LOST_POLL: Duration = Duration::from_millis(200);
/// The held lock; streaming must stop when `lost` resolves.
pub struct Leadership {
    client: tokio_postgres::Client,
    took_over: bool,
    tenure: Arc<Tenure>,
}

impl Leadership {
    /// Resolves when the lock's connection has closed or failed; until then each answered
    /// check renews the tenure, and losing it revokes the tenure first. A check that is only
    /// slow (a busy database) does not end leadership: the tenure lapses until one answers.
    pub async fn lost(&self) {
        loop {
            tokio::time::sleep(LOST_POLL).await;
            let sent = Instant::now();
            match tokio::time::timeout(TENURE, self.client.simple_query("SELECT 1")).await {
                Ok(Ok(_)) if !self.client.is_closed() => self.tenure.renew_from(sent),
                Ok(_) => {
                    self.tenure.revoke();
                    return;
                }
                Err(_slow) if self.client.is_closed() => {
                    self.tenure.revoke();
                    return;
                }
                Err(_slow) => {}
            }
        }
    }

    /// Whether the lock's connection still answers (a reconnect after a blip checks before it
    /// streams again: a lock lost meanwhile must not stream for a moment).
    pub async fn still_held(&self) -> bool {
        let sent = Instant::now();
        let answered = tokio::time::timeout(TENURE, self.client.simple_query("SELECT 1")).await;
        let held = matches!(answered, Ok(Ok(_))) && !self.client.is_closed();
        if held {
            self.tenure.renew_from(sent);
        } else {
            self.tenure.revoke();
        }
        held
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

/// Waits until this process holds the slot's lock, then one [`TENURE`] more (a previous
/// holder's tenure has run out by then); `None` on shutdown. `status` says standing by only
/// while another process holds the lock (`/readyz` is 200 then), never during the wait.
pub async fn acquire(
    db: &Db,
    slot: &str,
    tenure: &Arc<Tenure>,
    status: &ReplicationStatus,
    shutdown: &CancellationToken,
) -> Result<Option<Leadership>, DbError> {
    let key = lock_key(slot);
    let mut announced = false;
    loop {
        let client = db.connect().await?;
        let got: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).await?.get(0);
        status.standby.store(!got, Ordering::Relaxed);
        if got {
            if announced {
                tracing::info!(slot, "took over replication");
            }
            status.set_last_error(format!(
                "starting: took the replication lock, waiting {TENURE:?} before streaming (a previous holder's \
                 attempts end by then)"
            ));
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(TENURE) => {}
            }
            tenure.renew_from(Instant::now());
            return Ok(Some(Leadership { client, took_over: announced, tenure: tenure.clone() }));
        }
        if !announced {
            tracing::info!(slot, "another walhook process streams this slot; standing by");
            announced = true;
        }
        drop(client);
        tokio::select! {
            _ = shutdown.cancelled() => {
                status.standby.store(false, Ordering::Relaxed);
                return Ok(None);
            }
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenure_counts_from_when_the_check_was_sent() {
        let t = Tenure::default();
        assert!(t.is_valid(), "no leadership governs a fresh tenure");
        t.renew_from(Instant::now());
        assert!(t.is_valid());
        // A check sent before a long freeze and answered after it grants nothing.
        t.renew_from(Instant::now() - TENURE - Duration::from_millis(1));
        assert!(!t.is_valid());
        t.renew_from(Instant::now());
        t.revoke();
        assert!(!t.is_valid());
    }
}
