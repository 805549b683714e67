//! walhook: a PostgreSQL logical-replication stream turned into signed, durable webhooks.
//!
//! Data flows one way: [`source`] reads the slot, decodes pgoutput rows into webhook bodies
//! and routes them to endpoints → [`delivery`] sends them from memory, and retries from the
//! outbox what must wait → [`store`] records every delivery and holds the outbox. Around
//! that flow: [`admin`] (the webhooks API), [`ops`] (metrics, health, logging), [`app`]
//! (starts and supervises the stages) and [`cli`] (the commands). `docs/architecture.md`
//! lists the invariants, where each is enforced and the test that would catch its violation.
//!
//! The folders are layers, lowest first; a module imports only from its own folder and the
//! layers below it (checked by the unit test in `layers`):
//! [`security`] → [`model`] → [`config`] → [`pg`] → [`ops`] → [`store`] → [`delivery`] →
//! [`source`] → [`admin`] → [`app`] → [`local`] → [`cli`].

pub mod security;

pub mod model;

pub mod config;

pub mod pg;

pub mod ops;

pub mod store;

pub(crate) mod delivery;

pub(crate) mod source;

pub mod admin;

pub mod app;

#[cfg(feature = "demo")]
pub mod local;

pub mod cli;

#[cfg(test)]
mod layers;
