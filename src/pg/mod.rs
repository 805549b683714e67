//! PostgreSQL plumbing: the connection pool, versioned migrations, the preflight checks,
//! the catalog of CRM tables, the runtime role's grants and what the primary shows about
//! failover safety.
//!
//! What must hold: errors name what to change (a setting, a grant, a migration); nothing
//! here reads or writes deliveries or endpoints (that is `store`).

pub(crate) mod catalog;
pub mod db;
pub mod failover;
pub(crate) mod grants;
pub mod migrate;
pub(crate) mod preflight;
