//! walhook: a PostgreSQL logical-replication stream turned into signed, durable webhooks.
//!
//! Data flows one way: [`replication`] reads the slot → [`decode`] turns pgoutput rows into
//! webhook bodies → [`route`] picks the endpoints → [`dispatch`] sends from memory → the
//! [`store`] writer records deliveries (or stores them in the outbox) → [`outbox`] workers
//! retry what waits. [`progress`] decides which LSN the slot may confirm. See DESIGN.md for
//! the invariants every module keeps.

pub mod api;
pub mod app;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod db;
pub mod decode;
pub mod demo;
pub mod dispatch;
pub mod endpoints;
pub mod grants;
pub mod invisible;
pub mod leader;
pub mod listener;
pub mod local;
pub mod maintenance;
pub mod metrics;
pub mod migrate;
pub mod ops;
pub mod outbox;
pub mod pgoutput;
pub mod preflight;
pub mod progress;
pub mod replication;
pub mod route;
pub mod route_versions;
pub mod secrets;
pub mod sign;
pub mod slot;
pub mod store;
pub mod supervise;
pub mod tls;
pub mod values;
