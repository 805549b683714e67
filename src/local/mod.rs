//! Local stand-ins for the outside world, used by `walhook demo`, the tests and the
//! benchmark: a throwaway PostgreSQL cluster, a throwaway CA, and an HTTPS webhook receiver
//! that verifies signatures and can misbehave on purpose.

pub mod cluster;
pub mod demo;
pub mod port;
pub mod receiver;
pub mod tls;

/// The sample Driftwood CRM schema (tests, demo, benchmark; never applied by `migrate`).
pub const SAMPLE_CRM_SCHEMA: &str = include_str!("../../sql/examples/driftwood_crm.sql");
