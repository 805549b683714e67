//! Stream positions: where a change sits in the replication stream.
//!
//! What must hold: a change is identified by the LSN of its transaction's commit record and
//! its place among the CRM row events of that transaction (1 for the first; a row that moves
//! between accounts is two events, so it takes two places); positions order
//! as the stream does (commit LSN first, then place), and the event and delivery ids are
//! derived from them ([`crate::model::delivery::event_id`]).

use std::fmt;

/// Where a change sits in the replication stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    /// LSN of the source transaction's commit record.
    pub commit_lsn: u64,
    /// Place of the change among its transaction's CRM rows (1 for the first; 0 before any).
    pub seq: u32,
}

impl Position {
    /// The change at `seq` in the transaction committed at `commit_lsn`.
    pub const fn new(commit_lsn: u64, seq: u32) -> Self {
        Position { commit_lsn, seq }
    }
}

/// PostgreSQL's LSN notation, then the place: `0/1A2B3C8#3`.
impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}#{}", self.commit_lsn >> 32, self.commit_lsn & 0xFFFF_FFFF, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_by_commit_then_place() {
        let mut ps = vec![
            Position::new(0x2000, 1),
            Position::new(0x1000, 9),
            Position::new(0x1_0000_0000, 0),
            Position::new(0x1000, 2),
            Position::new(0x2000, 0),
        ];
        ps.sort();
        assert_eq!(
            ps,
            [
                Position::new(0x1000, 2),
                Position::new(0x1000, 9),
                Position::new(0x2000, 0),
                Position::new(0x2000, 1),
                Position::new(0x1_0000_0000, 0),
            ]
        );
        assert!(Position::new(0x1000, u32::MAX) < Position::new(0x1001, 0));
    }

    #[test]
    fn shown_as_an_lsn_and_a_place() {
        assert_eq!(Position::new(0x1A2B3C8, 3).to_string(), "0/1A2B3C8#3");
        assert_eq!(Position::new(0x16_0000_00FF, 0).to_string(), "16/FF#0");
    }
}
