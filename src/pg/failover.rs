//! Failover safety as the primary shows it: whether walhook's slot is a failover slot
//! (PostgreSQL 17+), which standbys the primary waits for before it sends changes
//! (`synchronized_standby_slots`), whether each is connected and holds the WAL up to the
//! slot's confirmed position, and the settings that can invalidate the slot while walhook is
//! down (`max_slot_wal_keep_size`, PostgreSQL 18's `idle_replication_slot_timeout`).
//!
//! What must hold: reading works on every supported version (15 and later: columns and
//! settings a version lacks read as absent, never as an error); nothing here makes walhook
//! not ready (a database without a standby is a valid deployment), it informs `/readyz`'s
//! JSON, three gauges and start-up warnings that say what to set. The primary cannot see a
//! standby's copy of the slot: "ready" means the standby can have it (failover slot, standby
//! named, connected, WAL received); the standby's `pg_replication_slots.synced` is the final
//! word (docs/operations.md, "Failover on PostgreSQL 17 and later").

use serde::Serialize;
use tokio_postgres::GenericClient;

use crate::pg::db::DbError;

/// A standby the primary names in `synchronized_standby_slots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StandbySlot {
    /// The physical slot's name.
    pub name: String,
    /// A physical slot of that name exists on the primary.
    pub exists: bool,
    /// A standby streams from it now.
    pub active: bool,
    /// The standby has received the WAL up to walhook's confirmed position.
    pub has_wal: bool,
}

/// What the primary shows about failover safety.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailoverView {
    /// `server_version_num`.
    pub server_version: i32,
    /// Not in recovery.
    pub primary: bool,
    /// The slot's `failover` flag; `None` before PostgreSQL 17 or while the slot is missing.
    pub slot_failover: Option<bool>,
    /// The standbys the primary waits for, in `synchronized_standby_slots` order.
    pub standby_slots: Vec<StandbySlot>,
    /// Physical slots a standby streams from now (named in the setting or not).
    pub physical_standbys: i64,
    /// `max_slot_wal_keep_size` as `SHOW` gives it (`-1`: unlimited).
    pub max_slot_wal_keep_size: String,
    /// `idle_replication_slot_timeout` as `SHOW` gives it (PostgreSQL 18+; `0`: off).
    pub idle_replication_slot_timeout: Option<String>,
}

impl FailoverView {
    /// PostgreSQL 17 or later, on a primary: logical slots can be carried to a standby.
    pub fn supported(&self) -> bool {
        self.server_version >= 170_000 && self.primary
    }

    /// A failover now would find the slot on a standby, as far as the primary can tell: it is
    /// a failover slot, and every standby the primary names is connected and has the WAL.
    pub fn ready(&self) -> bool {
        self.supported()
            && self.slot_failover == Some(true)
            && !self.standby_slots.is_empty()
            && self.standby_slots.iter().all(|s| s.exists && s.active && s.has_wal)
    }

    /// What to set for a safe failover, one line each (empty when nothing is missing).
    pub fn advice(&self, slot: &str) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(timeout) = self.idle_replication_slot_timeout.as_deref().filter(|t| *t != "0") {
            out.push(format!(
                "idle_replication_slot_timeout is {timeout}: PostgreSQL invalidates slot {slot} at the first \
                 checkpoint after walhook has been stopped that long, and walhook then reports it lost (changes in \
                 between are not delivered). Set it to 0, or longer than any stop walhook may have"
            ));
        }
        if !self.supported() {
            return out;
        }
        if self.standby_slots.is_empty() && self.physical_standbys > 0 {
            out.push(
                "a standby streams from this primary but synchronized_standby_slots is empty: the primary may send walhook changes a standby has not \
                 received, and a failover then loses them. On the primary set synchronized_standby_slots to the \
                 standby's physical slot (primary_slot_name on the standby); on the standby set \
                 sync_replication_slots = on, hot_standby_feedback = on and a primary_conninfo that names a \
                 dbname (README, \"Preparing the CRM database\", step 5)"
                    .to_owned(),
            );
        }
        for s in &self.standby_slots {
            if !s.exists {
                out.push(format!(
                    "synchronized_standby_slots names {}, which is not a physical slot on this primary: the primary \
                     waits for it and sends walhook nothing; create it (pg_create_physical_replication_slot) for the \
                     standby, or remove it from the setting",
                    s.name
                ));
            } else if !s.active {
                out.push(format!(
                    "standby slot {} (synchronized_standby_slots) has no standby connected: the primary holds back \
                     changes from walhook until one streams from it again",
                    s.name
                ));
            }
        }
        out
    }

    /// The standby slots the primary waits for before it sends walhook anything, but that no
    /// standby streams from (missing, or nothing connected): while one is there, walhook
    /// receives no changes at all.
    pub fn held_back_by(&self) -> Vec<&str> {
        if !self.supported() {
            return Vec::new();
        }
        self.standby_slots.iter().filter(|s| !s.exists || !s.active).map(|s| s.name.as_str()).collect()
    }

    /// What an operator should know though nothing is wrong (an INFO each): the version cannot
    /// carry the slot, no standby is set up to, or the slot is about to be made a failover slot.
    pub fn notes(&self, slot: &str) -> Vec<String> {
        if self.supported() && self.slot_failover == Some(false) {
            return vec![format!(
                "replication slot {slot} has failover = false, so no standby carries it: walhook alters it before \
                 it next streams from it (as a role with REPLICATION; it says so if it cannot). By hand, walhook \
                 stopped: psql \"dbname=... replication=database\" -c 'ALTER_REPLICATION_SLOT {slot} (FAILOVER true)'"
            )];
        }
        if self.primary && !self.supported() {
            return vec![format!(
                "PostgreSQL {} does not carry logical replication slots to a standby: after a failover, slot {slot} \
                 is missing on the new primary, walhook reports it lost and `walhook slot-reset` records the gap \
                 (PostgreSQL 17 and later carry it; see docs/operations.md)",
                self.server_version / 10_000
            )];
        }
        if self.supported() && self.standby_slots.is_empty() && self.physical_standbys == 0 {
            return vec![format!(
                "no standby is set up to carry slot {slot} over a failover (synchronized_standby_slots is empty); \
                 README, \"Preparing the CRM database\", step 5, says what to set"
            )];
        }
        Vec::new()
    }
}

/// Reads the view for `slot`.
pub async fn inspect(client: &impl GenericClient, slot: &str) -> Result<FailoverView, DbError> {
    let r = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, NOT pg_is_in_recovery(), \
                    (SELECT (to_jsonb(s) ->> 'failover')::bool FROM pg_replication_slots s WHERE s.slot_name = $1), \
                    (SELECT s.confirmed_flush_lsn::text FROM pg_replication_slots s WHERE s.slot_name = $1), \
                    COALESCE(current_setting('synchronized_standby_slots', true), ''), \
                    current_setting('max_slot_wal_keep_size'), \
                    current_setting('idle_replication_slot_timeout', true), \
                    (SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'physical' AND active)",
            &[&slot],
        )
        .await?;
    let confirmed: Option<String> = r.get(3);
    let names = parse_list(&r.get::<_, String>(4));
    let mut standby_slots = Vec::with_capacity(names.len());
    for name in names {
        let found = client
            .query_opt(
                "SELECT active, COALESCE(restart_lsn >= $2::text::pg_lsn, false) FROM pg_replication_slots \
                 WHERE slot_name = $1 AND slot_type = 'physical'",
                &[&name, &confirmed.as_deref().unwrap_or("0/0")],
            )
            .await?;
        standby_slots.push(match found {
            Some(f) => StandbySlot { name, exists: true, active: f.get(0), has_wal: f.get(1) },
            None => StandbySlot { name, exists: false, active: false, has_wal: false },
        });
    }
    Ok(FailoverView {
        server_version: r.get(0),
        primary: r.get(1),
        slot_failover: r.get(2),
        standby_slots,
        max_slot_wal_keep_size: r.get(5),
        idle_replication_slot_timeout: r.get(6),
        physical_standbys: r.get(7),
    })
}

/// A list setting's names as PostgreSQL reads them: comma-separated identifiers, folded to
/// lower case unless double-quoted.
fn parse_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
        .map(|n| match n.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
            Some(quoted) => quoted.replace("\"\"", "\""),
            None => n.to_lowercase(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(version: i32, failover: Option<bool>, standbys: &[(bool, bool, bool)]) -> FailoverView {
        FailoverView {
            server_version: version,
            primary: true,
            slot_failover: failover,
            standby_slots: standbys
                .iter()
                .enumerate()
                .map(|(i, &(exists, active, has_wal))| StandbySlot { name: format!("s{i}"), exists, active, has_wal })
                .collect(),
            max_slot_wal_keep_size: "-1".into(),
            idle_replication_slot_timeout: None,
            physical_standbys: standbys.iter().filter(|s| s.1).count() as i64,
        }
    }

    #[test]
    fn ready_needs_a_failover_slot_and_every_named_standby_connected_with_the_wal() {
        assert!(view(180_006, Some(true), &[(true, true, true)]).ready());
        assert!(!view(180_006, Some(true), &[]).ready(), "no standby named");
        assert!(!view(180_006, Some(false), &[(true, true, true)]).ready(), "not a failover slot");
        assert!(!view(180_006, Some(true), &[(true, true, true), (true, false, false)]).ready(), "one disconnected");
        assert!(!view(180_006, Some(true), &[(true, true, false)]).ready(), "behind");
        assert!(!view(150_014, None, &[]).ready(), "15 cannot");
    }

    #[test]
    fn advice_says_what_to_set() {
        assert!(view(180_006, Some(true), &[(true, true, true)]).advice("w").is_empty());
        let mut unnamed = view(180_006, Some(true), &[]);
        assert!(unnamed.advice("w").is_empty(), "no standby at all: nothing to warn about");
        assert!(unnamed.notes("w")[0].contains("no standby is set up"));
        unnamed.physical_standbys = 1;
        let empty = unnamed.advice("w").join("\n");
        assert!(empty.contains("synchronized_standby_slots") && empty.contains("sync_replication_slots = on"));
        let off = view(170_000, Some(false), &[(true, true, true)]);
        assert!(off.advice("w").is_empty(), "walhook alters it itself: not a warning");
        assert!(off.notes("w")[0].contains("ALTER_REPLICATION_SLOT w (FAILOVER true)"));
        let missing = view(170_000, Some(true), &[(false, false, false)]).advice("w").join("\n");
        assert!(missing.contains("s0, which is not a physical slot"), "{missing}");
        let mut idle = view(180_006, Some(true), &[(true, true, true)]);
        idle.idle_replication_slot_timeout = Some("0".into());
        assert!(idle.advice("w").is_empty());
        idle.idle_replication_slot_timeout = Some("1d".into());
        assert!(idle.advice("w")[0].contains("idle_replication_slot_timeout is 1d"));
        assert!(view(160_004, None, &[]).advice("w").is_empty());
        let old = view(160_004, None, &[]).notes("w").join("\n");
        assert!(old.contains("PostgreSQL 16 does not carry") && old.contains("slot-reset"), "{old}");
    }

    #[test]
    fn walhook_is_held_back_by_a_named_standby_slot_that_nothing_streams_from() {
        assert!(view(180_006, Some(true), &[(true, true, false)]).held_back_by().is_empty(), "behind is not held");
        assert_eq!(view(180_006, Some(true), &[(true, true, true), (false, false, false)]).held_back_by(), ["s1"]);
        assert_eq!(view(180_006, Some(true), &[(true, false, false)]).held_back_by(), ["s0"]);
        assert!(view(160_000, None, &[(false, false, false)]).held_back_by().is_empty(), "16 has no such setting");
    }

    #[test]
    fn list_settings_are_split_and_unquoted() {
        assert_eq!(parse_list(""), Vec::<String>::new());
        assert_eq!(parse_list("a, \"B c\" ,D"), vec!["a", "B c", "d"], "unquoted names fold to lower case");
    }
}
