//! The transaction step: one replication event in, what it means out. No I/O, nothing async:
//! the session reads the stream and acts on the outputs, and tests feed it hand-made events.
//!
//! What must hold:
//! - Every row of a transaction gets its own place: the commit LSN and a sequence number
//!   counted from 1 in stream order ([`Position`]), so event and delivery ids derived from it
//!   are the same on every replay (invariant 2). A row that moves between accounts is two
//!   rows (it leaves, then joins), each with its own place.
//! - A transaction whose commit LSN is at or below the newest recorded delivery (given at
//!   [`TxStep::new`]) is marked replayed in its [`Step::Begin`]; the emitter then sends only
//!   what is not recorded.
//! - A relation with column types the decoder does not know yet is held back as
//!   [`Step::NeedTypes`]: the caller looks them up (the one thing here that needs the
//!   database) and hands the relation back with [`TxStep::add_relation`] before the next event.
//! - Logical messages are passed on with their prefix and content, transactional or not.

use bytes::Bytes;
use pgwire_replication::ReplicationEvent;
use uuid::Uuid;

use crate::model::position::Position;
use crate::source::decode::{DecodeError, Decoded, Decoder, EndpointRow, RowChange};
use crate::source::pgoutput::{self, Message, Relation};

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// The transaction being read, as its Begin described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxInfo {
    /// The transaction id.
    pub xid: u32,
    /// The commit LSN (the Begin's final LSN): the `commit_lsn` of every row's [`Position`].
    pub commit_lsn: u64,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_us: i64,
    /// Commit time, RFC 3339 (the `timestamp` of every body).
    pub timestamp: String,
    /// The commit is at or below the newest recorded delivery: it may be recorded already.
    pub replay: bool,
}

/// What one replication event means.
#[derive(Debug)]
pub enum Step {
    /// A transaction begins.
    Begin(TxInfo),
    /// A CRM row changed, at this place in its transaction (position 0 outside one).
    Row(RowChange, Position),
    /// An endpoint was inserted or updated.
    EndpointUpsert(EndpointRow),
    /// An endpoint was deleted.
    EndpointDelete(Uuid),
    /// CRM tables were truncated (no events).
    Truncate(Vec<String>),
    /// The open transaction committed.
    Commit {
        /// The end of the commit record: where the slot may be confirmed to.
        end_lsn: u64,
        /// Commit time (Unix epoch µs) of the transaction its Begin opened; `None` when no
        /// Begin was read.
        commit_us: Option<i64>,
    },
    /// The server's keepalive: WAL up to `wal_end` holds nothing more for this stream.
    KeepAlive {
        /// The server's WAL end.
        wal_end: u64,
    },
    /// A logical message (`pg_logical_emit_message`).
    Message {
        /// Written inside a transaction (read at its commit) or not (read at once).
        transactional: bool,
        /// Its LSN.
        lsn: u64,
        /// Its prefix (`walhook.heartbeat`, `walhook.backfill.…`).
        prefix: String,
        /// Its content.
        content: Bytes,
    },
    /// A relation whose column types must be looked up first: resolve `oids` with
    /// [`TxStep::decoder_mut`]`.resolve_types`, then [`TxStep::add_relation`].
    NeedTypes {
        /// The relation held back.
        relation: Relation,
        /// The type OIDs the decoder does not know.
        oids: Vec<u32>,
    },
}

/// At most two steps (a row that moves between accounts is two).
#[derive(Debug, Default)]
pub struct Steps(Option<Step>, Option<Step>);

impl Steps {
    fn none() -> Steps {
        Steps(None, None)
    }

    fn one(step: Step) -> Steps {
        Steps(Some(step), None)
    }
}

impl Iterator for Steps {
    type Item = Step;

    fn next(&mut self) -> Option<Step> {
        self.0.take().or_else(|| self.1.take())
    }
}

/// Reads transactions out of replication events: owns the decoder and the open transaction.
#[derive(Debug)]
pub struct TxStep {
    decoder: Decoder,
    /// Commits at or below this LSN may already be recorded.
    replay_until: u64,
    /// The open transaction, and the place of the last row read (seq 0 before the first).
    open: Option<(TxInfo, Position)>,
}

impl TxStep {
    /// A step for one session: CRM tables in `crm_schema`; commits at or below
    /// `replay_until` are replays.
    pub fn new(crm_schema: &str, replay_until: u64) -> TxStep {
        TxStep { decoder: Decoder::new(crm_schema), replay_until, open: None }
    }

    /// The transaction being read, if one is open.
    #[cfg(test)]
    pub fn open(&self) -> Option<&TxInfo> {
        self.open.as_ref().map(|(tx, _)| tx)
    }

    /// The xid of the transaction being read, if one is open.
    #[cfg(test)]
    pub fn xid(&self) -> Option<u32> {
        self.open().map(|tx| tx.xid)
    }

    /// The decoder, to resolve the types a [`Step::NeedTypes`] names.
    pub fn decoder_mut(&mut self) -> &mut Decoder {
        &mut self.decoder
    }

    /// Records a relation held back by [`Step::NeedTypes`] (once its types are resolved).
    pub fn add_relation(&mut self, relation: Relation) {
        self.decoder.add_relation(relation);
    }

    /// What `event` means.
    pub fn apply(&mut self, event: ReplicationEvent) -> Result<Steps, DecodeError> {
        Ok(match event {
            ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                let commit_us = commit_time_micros + PG_EPOCH_OFFSET_US;
                let timestamp = chrono::DateTime::from_timestamp_micros(commit_us)
                    .unwrap_or_default()
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
                let commit_lsn = final_lsn.as_u64();
                let tx = TxInfo { xid, commit_lsn, commit_us, timestamp, replay: commit_lsn <= self.replay_until };
                self.open = Some((tx.clone(), Position::new(commit_lsn, 0)));
                Steps::one(Step::Begin(tx))
            }
            ReplicationEvent::XLogData { data, .. } => self.data(pgoutput::parse(data)?)?,
            ReplicationEvent::Commit { end_lsn, .. } => {
                let commit_us = self.open.take().map(|(tx, _)| tx.commit_us);
                Steps::one(Step::Commit { end_lsn: end_lsn.as_u64(), commit_us })
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => Steps::one(Step::KeepAlive { wal_end: wal_end.as_u64() }),
            ReplicationEvent::Message { transactional, lsn, prefix, content } => {
                Steps::one(Step::Message { transactional, lsn: lsn.as_u64(), prefix, content })
            }
            ReplicationEvent::StoppedAt { .. } => Steps::none(),
        })
    }

    fn data(&mut self, msg: Message) -> Result<Steps, DecodeError> {
        if let Message::Relation(relation) = msg {
            let oids = self.decoder.unknown_types(&relation);
            if oids.is_empty() {
                self.decoder.add_relation(relation);
                return Ok(Steps::none());
            }
            return Ok(Steps::one(Step::NeedTypes { relation, oids }));
        }
        let timestamp = self.open.as_ref().map(|(tx, _)| tx.timestamp.as_str()).unwrap_or_default();
        Ok(match self.decoder.decode(msg, timestamp)? {
            Decoded::Row(change) => Steps::one(self.row(change)),
            // Two rows, each with its own place: the row leaves, then joins.
            Decoded::Moved { left, joined } => {
                let left = self.row(left);
                Steps(Some(left), Some(self.row(joined)))
            }
            Decoded::EndpointUpsert(row) => Steps::one(Step::EndpointUpsert(row)),
            Decoded::EndpointDelete(id) => Steps::one(Step::EndpointDelete(id)),
            Decoded::Truncate(tables) => Steps::one(Step::Truncate(tables)),
            Decoded::Nothing => Steps::none(),
        })
    }

    /// `change` at the next place of the open transaction.
    fn row(&mut self, change: RowChange) -> Step {
        let position = match self.open.as_mut() {
            Some((_, position)) => {
                position.seq += 1;
                *position
            }
            None => Position::default(),
        };
        Step::Row(change, position)
    }
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, BytesMut};
    use pgwire_replication::Lsn;

    use super::*;

    const ACCOUNT_A: &str = "aaaa0000-0000-4000-8000-000000000001";
    const ACCOUNT_B: &str = "bbbb0000-0000-4000-8000-000000000002";

    fn xlog(data: BytesMut) -> ReplicationEvent {
        ReplicationEvent::XLogData {
            wal_start: Lsn::from_u64(1),
            wal_end: Lsn::from_u64(2),
            server_time_micros: 0,
            data: data.freeze(),
        }
    }

    /// A Relation message for `schema.name` with columns (name, type OID).
    fn relation(id: u32, schema: &str, name: &str, columns: &[(&str, u32)]) -> ReplicationEvent {
        let mut b = BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(id);
        b.put_slice(format!("{schema}\0{name}\0").as_bytes());
        b.put_u8(b'f');
        b.put_u16(columns.len() as u16);
        for (i, (col, oid)) in columns.iter().enumerate() {
            b.put_u8(u8::from(i == 0));
            b.put_slice(format!("{col}\0").as_bytes());
            b.put_u32(*oid);
            b.put_i32(-1);
        }
        xlog(b)
    }

    fn tuple(b: &mut BytesMut, vals: &[&str]) {
        b.put_u16(vals.len() as u16);
        for v in vals {
            b.put_u8(b't');
            b.put_u32(v.len() as u32);
            b.put_slice(v.as_bytes());
        }
    }

    fn insert(rel: u32, vals: &[&str]) -> ReplicationEvent {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(rel);
        b.put_u8(b'N');
        tuple(&mut b, vals);
        xlog(b)
    }

    fn update(rel: u32, old: &[&str], new: &[&str]) -> ReplicationEvent {
        let mut b = BytesMut::new();
        b.put_u8(b'U');
        b.put_u32(rel);
        b.put_u8(b'O');
        tuple(&mut b, old);
        b.put_u8(b'N');
        tuple(&mut b, new);
        xlog(b)
    }

    fn begin(final_lsn: u64, xid: u32) -> ReplicationEvent {
        // 2026-01-01T00:00:00Z in PostgreSQL's epoch.
        let commit_time_micros = 1_767_225_600_000_000 - PG_EPOCH_OFFSET_US;
        ReplicationEvent::Begin { final_lsn: Lsn::from_u64(final_lsn), xid, commit_time_micros }
    }

    fn commit(lsn: u64, end_lsn: u64) -> ReplicationEvent {
        ReplicationEvent::Commit { lsn: Lsn::from_u64(lsn), end_lsn: Lsn::from_u64(end_lsn), commit_time_micros: 0 }
    }

    /// A step that knows `crm.projects` (relation 42: id, account_id, budget).
    fn with_projects(replay_until: u64) -> TxStep {
        let mut step = TxStep::new("crm", replay_until);
        let steps: Vec<_> = step
            .apply(relation(42, "crm", "projects", &[("id", 25), ("account_id", 2950), ("budget", 23)]))
            .unwrap()
            .collect();
        assert!(steps.is_empty(), "builtin types need no lookup: {steps:?}");
        step
    }

    fn all(step: &mut TxStep, event: ReplicationEvent) -> Vec<Step> {
        step.apply(event).unwrap().collect()
    }

    #[test]
    fn rows_get_the_commit_lsn_and_consecutive_seqs_and_the_commit_ends_the_transaction() {
        let mut step = with_projects(0);
        assert_eq!(step.xid(), None);
        let [Step::Begin(tx)] = &all(&mut step, begin(0x500, 77))[..] else { panic!() };
        assert_eq!(
            tx,
            &TxInfo {
                xid: 77,
                commit_lsn: 0x500,
                commit_us: 1_767_225_600_000_000,
                timestamp: "2026-01-01T00:00:00Z".into(),
                replay: false
            }
        );
        assert_eq!(step.xid(), Some(77));
        for seq in 1..=3 {
            let [Step::Row(change, position)] = &all(&mut step, insert(42, &[&format!("p{seq}"), ACCOUNT_A, "1"]))[..]
            else {
                panic!()
            };
            assert_eq!(*position, Position::new(0x500, seq));
            assert_eq!(change.entity_key, format!("projects:p{seq}"));
            assert!(std::str::from_utf8(&change.body).unwrap().contains(r#""timestamp":"2026-01-01T00:00:00Z""#));
        }
        let [Step::Commit { end_lsn, commit_us }] = all(&mut step, commit(0x500, 0x530))[..] else { panic!() };
        assert_eq!((end_lsn, commit_us), (0x530, Some(1_767_225_600_000_000)));
        assert_eq!(step.xid(), None, "no transaction is open after its commit");
        // The next transaction counts from 1 again.
        all(&mut step, begin(0x600, 78));
        let [Step::Row(_, position)] = &all(&mut step, insert(42, &["p9", ACCOUNT_A, "1"]))[..] else { panic!() };
        assert_eq!(*position, Position::new(0x600, 1));
    }

    #[test]
    fn a_row_moving_between_accounts_is_two_rows_with_consecutive_seqs() {
        let mut step = with_projects(0);
        all(&mut step, begin(0x700, 5));
        all(&mut step, insert(42, &["p0", ACCOUNT_A, "1"]));
        let steps = all(&mut step, update(42, &["p1", ACCOUNT_A, "12"], &["p1", ACCOUNT_B, "13"]));
        let [Step::Row(left, at_left), Step::Row(joined, at_joined)] = &steps[..] else { panic!("{steps:?}") };
        assert_eq!(left.event_type.to_string(), "project.deleted");
        assert_eq!(joined.event_type.to_string(), "project.created");
        assert_eq!(left.account_id, Uuid::parse_str(ACCOUNT_A).ok());
        assert_eq!(joined.account_id, Uuid::parse_str(ACCOUNT_B).ok());
        assert_eq!((*at_left, *at_joined), (Position::new(0x700, 2), Position::new(0x700, 3)));
        let [Step::Row(_, next)] = &all(&mut step, insert(42, &["p2", ACCOUNT_A, "1"]))[..] else { panic!() };
        assert_eq!(*next, Position::new(0x700, 4));
    }

    #[test]
    fn a_non_transactional_message_passes_with_its_prefix_and_content() {
        let mut step = with_projects(0);
        let message = ReplicationEvent::Message {
            transactional: false,
            lsn: Lsn::from_u64(0x900),
            prefix: "walhook.backfill.chunk".into(),
            content: Bytes::from_static(b"{\"low\":1}"),
        };
        let [Step::Message { transactional, lsn, prefix, content }] = &all(&mut step, message)[..] else { panic!() };
        assert!(!transactional);
        assert_eq!((*lsn, prefix.as_str(), &content[..]), (0x900, "walhook.backfill.chunk", &b"{\"low\":1}"[..]));
        assert_eq!(step.xid(), None, "a non-transactional message opens no transaction");
        let keepalive = ReplicationEvent::KeepAlive {
            wal_end: Lsn::from_u64(0x990),
            reply_requested: false,
            server_time_micros: 0,
        };
        assert!(matches!(all(&mut step, keepalive)[..], [Step::KeepAlive { wal_end: 0x990 }]));
    }

    #[test]
    fn a_commit_at_or_below_the_last_recorded_one_is_a_replay() {
        let mut step = with_projects(0x800);
        for (lsn, replay) in [(0x7ff, true), (0x800, true), (0x801, false)] {
            let [Step::Begin(tx)] = &all(&mut step, begin(lsn, 1))[..] else { panic!() };
            assert_eq!(tx.replay, replay, "commit at {lsn:#x}");
            assert_eq!(step.open().map(|t| t.replay), Some(replay));
            all(&mut step, commit(lsn, lsn + 0x30));
        }
    }

    #[test]
    fn a_relation_with_unknown_types_waits_for_them_and_others_are_added_at_once() {
        let mut step = TxStep::new("crm", 0);
        let steps =
            all(&mut step, relation(43, "crm", "contacts", &[("id", 25), ("account_id", 2950), ("mood", 99_001)]));
        let [Step::NeedTypes { relation, oids }] = &steps[..] else { panic!("{steps:?}") };
        assert_eq!((relation.id, oids.clone()), (43, vec![99_001]));
        let Some(Step::NeedTypes { relation, .. }) = steps.into_iter().next() else { panic!() };
        // Unresolved, the type is written as text; what matters here is that the relation is known.
        step.add_relation(relation);
        all(&mut step, begin(0x100, 9));
        let [Step::Row(change, _)] = &all(&mut step, insert(43, &["c1", ACCOUNT_A, "happy"]))[..] else { panic!() };
        assert_eq!(change.entity_key, "contacts:c1");
    }
}
