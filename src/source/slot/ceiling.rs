//! The confirm ceiling: how far the replication session may confirm the slot.
//!
//! What must hold:
//! - No position past the ceiling recorded in `walhook.slot_state` is ever sent to the
//!   server, so the slot walhook streams from is always confirmed at or below it.
//! - The ceiling is raised only by a statement that also checks that the slot's confirmed
//!   position is still at or below the old ceiling, and only as far as walhook wants to confirm:
//!   a position it has handled everything up to, read from its own slot's stream. A slot
//!   created anew (by anyone) starts past every such position: past the ceiling, so it is never
//!   mistaken for walhook's own (docs/architecture.md, invariant 13); and a slot advanced by
//!   someone else past what walhook handled is past it too (an advance within it skips nothing
//!   walhook had not delivered). A failed check ends the session; the next finds the slot lost.
//! - Raising costs a write, so it happens at most every [`RAISE_EVERY`], and never only to
//!   confirm the WAL of walhook's own last raise (an idle database would otherwise see one
//!   write after another).

use std::time::Duration;

use tokio::time::Instant;

use crate::pg::db::{Db, DbError};
use crate::store::slot_state;

/// Raises happen at most this often.
pub const RAISE_EVERY: Duration = Duration::from_millis(200);

/// Why the ceiling could not be raised.
#[derive(Debug, thiserror::Error)]
pub enum CeilingError {
    /// The query failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The slot is confirmed past the ceiling, or gone: not the slot walhook streams from.
    #[error(
        "replication slot {0} is confirmed past walhook's confirm ceiling, or is gone: it is not the slot \
         walhook streamed from"
    )]
    NotWalhooks(String),
}

/// The session's view of the ceiling and of what it would confirm.
#[derive(Debug)]
pub struct Ceiling {
    slot: String,
    /// Bytes since 0/0.
    ceiling: u64,
    /// Where the WAL ended after walhook's last raise committed.
    own_write_end: u64,
    /// The highest end of a settled transaction the session would confirm.
    wanted_commit: u64,
    /// The highest idle position (keepalive, heartbeat) the session would confirm.
    wanted_idle: u64,
    /// The last position handed to the server.
    sent: u64,
    last_raise: Option<Instant>,
}

impl Ceiling {
    /// The ceiling recorded for `slot` (0 when there is none: nothing may be confirmed).
    pub async fn load(db: &Db, slot: &str) -> Result<Ceiling, DbError> {
        let client = db.get().await?;
        let record = slot_state::record(&**client, slot).await?;
        let ceiling = record.and_then(|r| r.ceiling).unwrap_or(0).max(0) as u64;
        Ok(Ceiling::at(slot, ceiling))
    }

    /// A ceiling at `ceiling` (bytes since 0/0) for `slot`.
    pub fn at(slot: &str, ceiling: u64) -> Ceiling {
        Ceiling {
            slot: slot.to_owned(),
            ceiling,
            own_write_end: 0,
            wanted_commit: 0,
            wanted_idle: 0,
            sent: 0,
            last_raise: None,
        }
    }

    /// The session would confirm `lsn`: the end of settled transactions (`idle` false), or a
    /// keepalive or heartbeat position while nothing read is unsettled (`idle` true).
    pub fn want(&mut self, lsn: u64, idle: bool) {
        let wanted = if idle { &mut self.wanted_idle } else { &mut self.wanted_commit };
        *wanted = (*wanted).max(lsn);
    }

    /// The position to send to the server now, if it moved: what is wanted, up to the ceiling.
    pub fn take_sendable(&mut self) -> Option<u64> {
        let pos = self.wanted_commit.max(self.wanted_idle).min(self.ceiling);
        (pos > self.sent).then(|| {
            self.sent = pos;
            pos
        })
    }

    /// Whether something wanted waits for a raise: a settled transaction past the ceiling, or
    /// an idle position past both the ceiling and the end of walhook's own last raise.
    pub fn wants_raise(&self) -> bool {
        self.wanted_commit > self.ceiling || self.wanted_idle > self.ceiling.max(self.own_write_end)
    }

    /// When the next raise may run.
    pub fn next_raise(&self) -> Instant {
        self.last_raise.map_or_else(Instant::now, |t| t + RAISE_EVERY)
    }

    /// Raises the ceiling to what is wanted, if the slot is still walhook's.
    pub async fn raise(&mut self, db: &Db) -> Result<(), CeilingError> {
        self.last_raise = Some(Instant::now());
        let to = self.wanted_commit.max(self.wanted_idle);
        let client = db.get().await?;
        match slot_state::raise_ceiling(&**client, &self.slot, to).await? {
            Some(raised) => {
                tracing::trace!(ceiling = raised.ceiling, own_write_end = raised.after, "raised the confirm ceiling");
                self.ceiling = self.ceiling.max(raised.ceiling);
                self.own_write_end = raised.after;
                Ok(())
            }
            None => Err(CeilingError::NotWalhooks(self.slot.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_past_the_ceiling_is_sent() {
        let mut c = Ceiling::at("s", 1000);
        c.want(900, false);
        assert_eq!(c.take_sendable(), Some(900));
        assert_eq!(c.take_sendable(), None, "sent once");
        c.want(1500, false);
        assert_eq!(c.take_sendable(), Some(1000), "capped at the ceiling");
        assert!(c.wants_raise());
        c.ceiling = 2000;
        assert_eq!(c.take_sendable(), Some(1500));
        assert!(!c.wants_raise());
    }

    #[test]
    fn walhooks_own_raise_alone_asks_for_no_raise_but_a_commit_does() {
        let mut c = Ceiling::at("s", 1000);
        c.own_write_end = 1100;
        c.want(1100, true);
        assert!(!c.wants_raise(), "an idle position within walhook's own write");
        c.want(1101, true);
        assert!(c.wants_raise(), "anything more is someone else's WAL");
        let mut c = Ceiling::at("s", 1000);
        c.own_write_end = 1100;
        c.want(1050, false);
        assert!(c.wants_raise(), "a settled transaction is confirmed whatever wrote around it");
    }
}
