//! Security: what keeps secrets secret and hostile input out. Secrets at rest and signing
//! keys, the Standard Webhooks signature, the SSRF address check, TLS material, refusing
//! invisible characters, and the hardened HTTP listener.
//!
//! What must hold: no module here does I/O on walhook's tables or knows about the data
//! flow; it is the bottom layer and imports nothing else from the crate.

pub(crate) mod invisible;
pub mod jwt;
pub mod listener;
pub(crate) mod ranges;
pub mod secrets;
pub mod sign;
pub mod ssrf;
pub(crate) mod tls;
