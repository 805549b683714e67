//! Delivery: what happens to a routed delivery until it is delivered, failed or waiting in
//! the outbox. `dispatch` sends from memory in per-row order within a byte budget; the
//! `outbox` workers retry what waits there.
//!
//! What must hold: a delivery's ticket is settled only once the store has it (delivered or
//! stored); per endpoint, a row never has two deliveries in flight; nothing here imports
//! `source` (routing hands deliveries down as `model` values).

pub mod dispatch;
pub mod outbox;
