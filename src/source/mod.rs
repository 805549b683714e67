//! Source: the replication slot read as events. `replication` owns the stream and its
//! session (lock, reconnects, keepalives, confirm; `error` says why it stopped), `step` reads
//! transactions out of the stream's events without I/O, `emit` hands events to dispatch for
//! every producer (routing, memory budget, ids, tickets, the replay filter), `pgoutput` parses
//! the protocol, `decode` and `values` turn rows into webhook bodies (`changed` says which
//! columns an update changed), `route` (with `route_versions`) picks the endpoints, `leader`
//! decides which replica may stream, `slot` watches the slot and its prerequisites, and
//! `visible` waits until a transaction read from the stream can be seen by queries.
//!
//! What must hold: the slot confirms nothing past an unsettled delivery; a session routes
//! with the endpoints valid at the position it replays from; a lost slot is never replaced
//! silently.

pub mod backfill;
pub mod changed;
pub mod decode;
pub mod emit;
pub mod error;
pub mod leader;
pub mod pgoutput;
pub mod replication;
pub mod route;
pub mod route_versions;
pub mod slot;
pub mod step;
pub mod values;
pub mod visible;
