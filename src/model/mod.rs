//! The vocabulary every stage shares: event types, stream positions, events and
//! deliveries, endpoints as routing sees them, attempts and their failure kinds, the
//! progress tickets that decide what the slot may confirm, and leadership's tenure.
//!
//! What must hold: no I/O here (no database, no network, no files); only plain data and the
//! rules that belong to it, so stages can pass these values one way without importing each
//! other.

pub mod attempt;
pub mod columns;
pub mod delivery;
pub mod event;
pub mod position;
pub mod progress;
pub(crate) mod tenure;
