//! walhook's integration tests, in one test binary: one link instead of one per file, and one
//! throwaway PostgreSQL cluster (`common::cluster`) shared by every test that does not need a
//! cluster of its own. Tests are named `file::test`, e.g. `poison::a_hostile_receiver_stops_no_other_account`;
//! `cargo test --test it -- poison::` runs one file's tests.
//!
//! What must hold: every test is correct however many of them run at once in this one process.
//! So a test changes no process-wide state (environment variables, resource limits, the log
//! subscriber, the working directory): it sets them on the child processes it starts, or runs
//! alone in a child process of this binary (`common::alone`). Each test has its own database,
//! slot and publication (named after the test, unique across all files); anything it looks up
//! cluster-wide (slots, walsenders, locks, roles) it narrows to its own database or names.
//! A new test file goes here as a module, not as a new `tests/*.rs` binary.

mod common;
mod tools;

mod alerts;
mod api;
mod architecture_doc;
mod backfill;
mod backfill_edges;
mod columns;
mod config_errors;
mod contract;
mod crash;
mod dashboard;
mod delivery;
mod demo;
mod docs_truth;
mod engine;
mod events;
mod failover;
mod fairness;
mod helm_chart;
mod history;
mod leases;
mod listeners;
mod memory;
mod ops;
mod pg_restart;
mod poison;
mod preflight;
mod previous;
mod previous_edges;
mod production_setup;
mod readiness;
mod replay_routing;
mod resend;
mod resend_races;
mod retention;
mod signatures;
mod signing;
mod slot_loss;
mod ssrf;
mod store;
mod supervise;
mod takeover;
mod types;
