//! Configuration: embedded defaults ← `--config` TOML file ← `WALHOOK_<SECTION>__<KEY>` env.
//!
//! What must hold: an unknown key or a bad value stops start-up with an error that names the
//! key (`dispatch.request_timeout`, not "invalid type"); secrets (`database.url`'s password,
//! `auth.jwt_hs256_secret`, `secrets.encryption_key`) never appear in `Debug` output or in
//! `check-config`'s rendering.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

mod conninfo;

/// Shortest accepted `auth.jwt_hs256_secret`, in bytes (the HMAC-SHA256 output size).
pub const MIN_JWT_KEY_BYTES: usize = 32;

/// The most rows one backfill chunk may read (`backfill.chunk_size`).
pub const MAX_BACKFILL_CHUNK: usize = 100_000;

/// The defaults every other layer overrides, embedded at build time.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Errors raised while loading or validating configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key is unknown, missing or has the wrong type; the message names it.
    #[error("configuration: {0}")]
    Invalid(String),
    /// The `--config` file could not be read.
    #[error("configuration file {path}: {cause}")]
    File {
        /// The file that was asked for.
        path: PathBuf,
        /// Why it could not be read.
        cause: std::io::Error,
    },
}

/// The whole configuration of a walhook process.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The CRM database walhook reads from and keeps its own tables in.
    pub database: DatabaseConfig,
    /// The admin API listener.
    pub api: ApiConfig,
    /// The metrics and health listener.
    pub metrics: MetricsConfig,
    /// Replication slot and publication.
    pub replication: ReplicationConfig,
    /// Who may call the admin API.
    pub auth: AuthConfig,
    /// Encryption of signing secrets at rest.
    pub secrets: SecretsConfig,
    /// How webhooks are sent and retried.
    pub dispatch: DispatchConfig,
    /// How long finished deliveries are kept.
    pub retention: RetentionConfig,
    /// How backfills (`webhooks-backfill`) read the CRM's tables.
    pub backfill: BackfillConfig,
    /// Log format and level.
    pub log: LogConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
}

/// `[database]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// libpq-style URL (`postgres://user:pass@host:5432/db?sslmode=require`). The role needs
    /// the REPLICATION attribute; its password is redacted wherever the URL is shown.
    pub url: SecretUrl,
    /// Connections in the pool used for walhook's own tables and the API.
    pub pool_size: usize,
    /// Schema holding the CRM tables (`contacts`, `companies`, `activities`, `projects`).
    pub crm_schema: Identifier,
    /// PEM trust roots for the database's TLS certificate (with `sslmode=require`); the
    /// Mozilla roots are used when absent.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// The role `walhook run` connects as, when `walhook migrate` runs as another one (the CRM
    /// tables' owner): migrate then grants it what `run` needs on schema `walhook` (USAGE;
    /// SELECT, INSERT, UPDATE, DELETE on its tables; SELECT on `schema_migrations`) and
    /// nothing more. Unset: migrate grants nothing.
    #[serde(default)]
    pub runtime_role: Option<Identifier>,
    /// A store write that has not committed for this long (a lock, a database that refuses
    /// every write) is a stall: logged at ERROR, `walhook_store_stalled` 1, `/readyz` 503.
    pub write_stall_after: HumanDuration,
}

/// `[api]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address the admin API listens on.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub max_body_bytes: usize,
    /// Requests per second one account may make (429 beyond), per replica: each process
    /// counts on its own, so N replicas let up to N times this through; 0 turns it off.
    pub rate_limit_per_second: u32,
    /// Requests an account may make at once before the rate applies.
    pub rate_limit_burst: u32,
    /// Webhook endpoints one account may have; `webhooks-create` beyond it is refused.
    pub max_endpoints_per_account: u32,
    /// Connections open at once at most; a new one beyond closes the oldest connection that
    /// is not handling a request it has read completely (silent, still sending its request,
    /// or idle between requests), or waits in the kernel's backlog when every one is.
    pub max_connections: usize,
    /// Time a client gets to send a request's headers, from connecting or from the end of
    /// its previous response (so it also closes idle keep-alive connections); also the time
    /// it gets to send a whole request, headers and body, from the request's first byte.
    pub header_timeout: HumanDuration,
    /// A connection on which no byte is read or written for this long is closed.
    pub idle_timeout: HumanDuration,
}

impl ApiConfig {
    /// The listener's limits.
    pub fn limits(&self) -> crate::security::listener::ListenerLimits {
        crate::security::listener::ListenerLimits {
            max_connections: self.max_connections,
            header_timeout: self.header_timeout.get(),
            idle_timeout: self.idle_timeout.get(),
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address serving `/metrics`, `/healthz` and `/readyz`.
    pub listen: SocketAddr,
    /// Connections open at once at most; a new one beyond closes the oldest connection that
    /// is not handling a request it has read completely (silent, still sending its request,
    /// or idle between requests), or waits in the kernel's backlog when every one is.
    pub max_connections: usize,
    /// Time a client gets to send a request's headers, from connecting or from the end of
    /// its previous response (so it also closes idle keep-alive connections); also the time
    /// it gets to send a whole request, headers and body, from the request's first byte.
    pub header_timeout: HumanDuration,
    /// A connection on which no byte is read or written for this long is closed.
    pub idle_timeout: HumanDuration,
}

impl MetricsConfig {
    /// The listener's limits.
    pub fn limits(&self) -> crate::security::listener::ListenerLimits {
        crate::security::listener::ListenerLimits {
            max_connections: self.max_connections,
            header_timeout: self.header_timeout.get(),
            idle_timeout: self.idle_timeout.get(),
        }
    }
}

/// `[replication]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Logical replication slot (pgoutput); created by `walhook migrate`. A slot walhook
    /// streamed from that goes missing is not re-created: `walhook slot-reset` does that.
    pub slot: Identifier,
    /// Publication over the CRM tables and `walhook.endpoints`; created by `walhook migrate`.
    pub publication: Identifier,
    /// How often the confirmed position is reported to the server.
    pub status_interval: HumanDuration,
    /// Interval of `pg_logical_emit_message` heartbeats; `0s` turns them off.
    pub heartbeat_interval: HumanDuration,
    /// How often the streaming replica re-checks the prerequisites (publication tables,
    /// replica identity, the slot's `wal_status`) while it runs, and how often a lost slot is
    /// looked at again (at most every 5s).
    pub recheck_interval: HumanDuration,
    /// A stream that brings nothing for half of this is sent a message it must bring back;
    /// one that brings nothing for all of it is stuck (a frozen walsender, a half-open
    /// connection) and the session is rebuilt.
    pub stream_timeout: HumanDuration,
    /// Whether `walhook migrate` sets REPLICA IDENTITY FULL on every CRM table, so that an
    /// update's old row is in the stream (`previous` in `*.updated` bodies, changed-column
    /// filters). `false`: it keeps each table's identity, except where deletes would lose
    /// `account_id` (those it still sets to FULL).
    pub replica_identity_full: bool,
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 key that signs Driftwood access tokens, at least 32 bytes; absent means JWTs
    /// are refused.
    #[serde(default)]
    pub jwt_hs256_secret: Option<Secret>,
    /// When set, a JWT must carry this audience in `aud`; absent or empty means `aud` is not
    /// checked.
    #[serde(default)]
    pub jwt_audience: Option<String>,
    /// When set, a JWT must carry this issuer in `iss`; absent or empty means `iss` is not
    /// checked.
    #[serde(default)]
    pub jwt_issuer: Option<String>,
    /// JWT claim holding the caller's account id.
    pub account_claim: String,
    /// Operator tokens, stored as hex SHA-256 of the token.
    pub static_tokens: Vec<StaticToken>,
}

/// One operator token of `auth.static_tokens`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StaticToken {
    /// Hex SHA-256 of the bearer token.
    pub token_sha256: String,
    /// Account the token acts for.
    pub account_id: uuid::Uuid,
    /// User recorded as `created_by`.
    pub user_id: uuid::Uuid,
}

/// `[secrets]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsConfig {
    /// Base64 of 32 bytes; when set, signing secrets are stored AES-256-GCM encrypted.
    #[serde(default)]
    pub encryption_key: Option<Secret>,
}

/// `[dispatch]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DispatchConfig {
    /// Private, loopback or link-local ranges that webhook targets may nevertheless use.
    pub allowed_cidrs: Vec<IpNet>,
    /// Extra PEM trust roots for HTTPS targets.
    pub ca_certs: Vec<PathBuf>,
    /// Delays between attempts: `n` entries mean `n` retries after the first attempt.
    pub retry_schedule: Vec<HumanDuration>,
    /// Random spread applied to each retry delay (0.2 = ±20%).
    pub jitter: f64,
    /// Time allowed to open a connection to a target.
    pub connect_timeout: HumanDuration,
    /// Time allowed for a whole request, response headers and body included.
    pub request_timeout: HumanDuration,
    /// Requests in flight across all endpoints.
    pub max_concurrency: usize,
    /// Requests in flight to one endpoint.
    pub endpoint_concurrency: usize,
    /// Requests in flight to the endpoints of one account, so that one account cannot take
    /// every request slot from the others.
    pub account_concurrency: usize,
    /// Deliveries one endpoint may have waiting in memory before it spills to the outbox.
    pub endpoint_queue: usize,
    /// Deliveries waiting in memory across endpoints before replication is paused.
    pub queue_capacity: usize,
    /// An endpoint that has not finished an attempt for this long while deliveries wait for
    /// it spills them to the outbox.
    pub spill_after: HumanDuration,
    /// How often the outbox is polled for due retries when nothing wakes it.
    pub poll_interval: HumanDuration,
    /// An endpoint whose deliveries have all failed for this long is disabled.
    pub disable_after: HumanDuration,
    /// Event payload bytes held in memory at most (waiting, in flight, on their way to the
    /// store); past it, reading the slot waits and waiting deliveries spill to the outbox.
    /// An integer (bytes) or a size such as `"64MiB"`.
    pub memory_limit: ByteSize,
}

/// `[retention]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Age after which delivered deliveries (and their events) are deleted.
    pub delivered: HumanDuration,
    /// Age after which failed deliveries (and their events) are deleted.
    pub failed: HumanDuration,
    /// The payload archive: every event's payload is kept this long (once, shared by its
    /// deliveries), so any delivery of the window can be redelivered or replayed. `"0s"`
    /// (the default) turns it off: only payloads a pending or failed delivery needs are kept.
    pub payloads: HumanDuration,
    /// How often the retention sweep runs.
    pub interval: HumanDuration,
    /// Rows deleted per statement, so a sweep never holds long locks.
    pub batch_size: i64,
}

/// `[backfill]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackfillConfig {
    /// Rows read per chunk: one short read transaction, between two watermarks in the WAL
    /// (fewer when the chunk's text passes a quarter of `dispatch.memory_limit`).
    pub chunk_size: usize,
    /// Rows per second all backfills together read at most; 0: no limit.
    pub rows_per_second: u32,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (human-readable; coloured only on a terminal without `NO_COLOR`) or `json`
    /// (one object per line).
    pub format: LogFormat,
    /// Filter in `RUST_LOG` syntax; `RUST_LOG` itself wins when set.
    pub level: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Time in-flight requests get to finish after SIGTERM (no new one starts); keep it
    /// above `dispatch.connect_timeout` + `dispatch.request_timeout`.
    pub grace: HumanDuration,
}

impl Config {
    /// Loads defaults, then `file` (when given), then `WALHOOK_*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            let text =
                std::fs::read_to_string(path).map_err(|cause| ConfigError::File { path: path.to_owned(), cause })?;
            figment = figment.merge(Toml::string(&text));
        }
        figment = figment.merge(Env::prefixed("WALHOOK_").split("__"));
        // RUST_LOG wins over log.level: it must not silence walhook by accident either.
        if let Some(filter) = std::env::var_os("RUST_LOG") {
            if let Err(why) = check_log_level(&filter.to_string_lossy()) {
                return Err(ConfigError::Invalid(format!("RUST_LOG (it wins over log.level): {why}")));
            }
        }
        Self::from_figment(figment, file)
    }

    /// Loads from an explicit TOML string layered over the defaults (tests, demo).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(DEFAULT_TOML)).merge(Toml::string(text)), None)
    }

    fn from_figment(figment: Figment, file: Option<&Path>) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(|e| {
            let msgs: Vec<String> = e.into_iter().map(|e| describe_figment_error(e, file)).collect();
            ConfigError::Invalid(msgs.join("; "))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that go beyond types: ranges and relations between keys.
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError::Invalid(format!("{key}: {why}")));
        if self.database.pool_size == 0 {
            return bad("database.pool_size", "must be at least 1");
        }
        if let Err(e) = self.database.url.expose().parse::<tokio_postgres::Config>() {
            return bad("database.url", &format!("not a valid PostgreSQL connection string ({e})"));
        }
        if self.dispatch.retry_schedule.is_empty() {
            return bad("dispatch.retry_schedule", "needs at least one delay");
        }
        if !(0.0..1.0).contains(&self.dispatch.jitter) {
            return bad("dispatch.jitter", "must be at least 0 and below 1");
        }
        for (key, value) in [
            ("dispatch.max_concurrency", self.dispatch.max_concurrency),
            ("dispatch.endpoint_concurrency", self.dispatch.endpoint_concurrency),
            ("dispatch.account_concurrency", self.dispatch.account_concurrency),
            ("api.max_endpoints_per_account", self.api.max_endpoints_per_account as usize),
            ("dispatch.endpoint_queue", self.dispatch.endpoint_queue),
            ("dispatch.queue_capacity", self.dispatch.queue_capacity),
            ("api.max_connections", self.api.max_connections),
            ("metrics.max_connections", self.metrics.max_connections),
        ] {
            if value == 0 {
                return bad(key, "must be at least 1");
            }
        }
        for (key, value) in [
            ("dispatch.request_timeout", &self.dispatch.request_timeout),
            ("dispatch.connect_timeout", &self.dispatch.connect_timeout),
            ("dispatch.poll_interval", &self.dispatch.poll_interval),
            ("replication.status_interval", &self.replication.status_interval),
            ("replication.recheck_interval", &self.replication.recheck_interval),
            ("replication.stream_timeout", &self.replication.stream_timeout),
            ("retention.interval", &self.retention.interval),
            ("database.write_stall_after", &self.database.write_stall_after),
            ("api.header_timeout", &self.api.header_timeout),
            ("api.idle_timeout", &self.api.idle_timeout),
            ("metrics.header_timeout", &self.metrics.header_timeout),
            ("metrics.idle_timeout", &self.metrics.idle_timeout),
        ] {
            if value.0.is_zero() {
                return bad(key, "must be longer than 0s");
            }
        }
        if !(ByteSize::MIB..=ByteSize::MAX_MEMORY_LIMIT).contains(&self.dispatch.memory_limit.get()) {
            return bad("dispatch.memory_limit", "must be at least 1MiB and at most 1TiB");
        }
        if self.api.rate_limit_per_second > 0 && self.api.rate_limit_burst == 0 {
            return bad("api.rate_limit_burst", "must be at least 1 when api.rate_limit_per_second is set");
        }
        if !(1..=MAX_BACKFILL_CHUNK).contains(&self.backfill.chunk_size) {
            return bad("backfill.chunk_size", &format!("must be between 1 and {MAX_BACKFILL_CHUNK}"));
        }
        if self.retention.batch_size < 1 {
            return bad("retention.batch_size", "must be at least 1");
        }
        if let Err(why) = check_log_level(&self.log.level) {
            return bad("log.level", &why);
        }
        self.validate_auth()?;
        for (i, t) in self.auth.static_tokens.iter().enumerate() {
            let ok = t.token_sha256.len() == 64 && t.token_sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !ok {
                return bad(
                    &format!("auth.static_tokens[{i}].token_sha256"),
                    "must be 64 hex characters (the SHA-256 of the token)",
                );
            }
        }
        if let Some(key) = &self.secrets.encryption_key {
            if crate::security::secrets::parse_encryption_key(key.expose()).is_err() {
                return bad("secrets.encryption_key", "must be base64 of exactly 32 bytes");
            }
        }
        for path in &self.dispatch.ca_certs {
            if !path.is_file() {
                return bad("dispatch.ca_certs", &format!("{} is not a readable file", path.display()));
            }
        }
        Ok(())
    }

    /// `[auth]`: an HMAC key short enough to guess (an empty environment variable included)
    /// would let anyone sign a token for any account.
    fn validate_auth(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError::Invalid(format!("{key}: {why}")));
        if let Some(key) = &self.auth.jwt_hs256_secret {
            if key.expose().len() < MIN_JWT_KEY_BYTES {
                return bad(
                    "auth.jwt_hs256_secret",
                    &format!(
                        "must be at least {MIN_JWT_KEY_BYTES} bytes (an empty or short HMAC key lets anyone sign \
                         tokens); unset it to refuse JWTs"
                    ),
                );
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML, secrets redacted (`walhook check-config`).
    pub fn render_redacted(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Refuses a `log.level` that would silence walhook by accident: every comma-separated
/// directive must name a level (`info`, or `target=level`), as `RUST_LOG` writes them.
fn check_log_level(filter: &str) -> Result<(), String> {
    const LEVELS: &str = "trace, debug, info, warn, error or off";
    if filter.trim().is_empty() {
        return Err(format!("is empty; give a level ({LEVELS}), e.g. \"info\""));
    }
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, level)| level);
        if level.parse::<tracing::level_filters::LevelFilter>().is_err() {
            return Err(format!(
                "{directive:?} in {filter:?} names no level: write a level ({LEVELS}) or target=level, as in \
                 \"info,walhook=debug\""
            ));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map(drop)
        .map_err(|e| format!("{filter:?} is not a log filter ({e}); e.g. \"info,walhook=debug\""))
}

/// Turns figment's error into one line that leads with the dotted key and says where the
/// value came from (the defaults are always valid, so a bad value is the file's or the
/// environment's).
fn describe_figment_error(e: figment::Error, file: Option<&Path>) -> String {
    let mut path = e.path.clone();
    if let figment::error::Kind::MissingField(f) = &e.kind {
        path.push(f.to_string()); // (an unknown field is already the last element of the path)
    }
    let key = path.join(".");
    let var = format!("WALHOOK_{}", path.join("__").to_uppercase());
    // The variable that set the value: the key's own, or a shorter prefix's for an element of
    // an array or table (`WALHOOK_DISPATCH__ALLOWED_CIDRS='["…"]'` for dispatch.allowed_cidrs.0).
    let set_by = (1..=path.len())
        .rev()
        .map(|n| format!("WALHOOK_{}", path[..n].join("__").to_uppercase()))
        .find(|v| std::env::var_os(v).is_some());
    let from = match set_by {
        Some(v) => format!(" (environment variable {v})"),
        None => file.map(|p| format!(" (in {})", p.display())).unwrap_or_default(),
    };
    match &e.kind {
        figment::error::Kind::UnknownField(..) => format!("{key}: unknown key{from}"),
        figment::error::Kind::MissingField(_) => {
            format!("{key}: missing and it has no default; set it in the config file or {var}")
        }
        other if key.is_empty() => format!("{other}{from}"),
        other => format!("{key}: {other}{from}"),
    }
}

/// A string that is never printed: `Debug` and `Serialize` show `"<redacted>"`.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// A database URL whose password is redacted when shown.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(value: impl Into<String>) -> Self {
        SecretUrl(value.into())
    }
    /// The URL with its password, for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The connection string with every password (`user:…@`, `?password=…`,
    /// `password=…`, quoted or not) replaced by `REDACTED`, checked against the parsed
    /// connection config.
    pub fn redacted(&self) -> String {
        conninfo::redact(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// A duration written the human way: `"5s"`, `"5m"`, `"2h"`, `"7d"`, `"250ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// The wrapped duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration like \"5s\" or \"2h\" ({e})")))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// A size in bytes: an integer, or a string with a unit (`"512KiB"`, `"64MiB"`, `"1GiB"`;
/// `KB`/`MB`/`GB` are read as the same powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// One mebibyte.
    pub const MIB: u64 = 1024 * 1024;
    /// The largest `dispatch.memory_limit` accepted (1 TiB).
    pub const MAX_MEMORY_LIMIT: u64 = 1024 * 1024 * Self::MIB;

    /// The size in bytes.
    pub fn get(self) -> u64 {
        self.0
    }

    fn parse(text: &str) -> Option<u64> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits.parse().ok()?;
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            _ => return None,
        };
        n.checked_mul(1u64 << shift)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => ByteSize::parse(&s)
                .map(ByteSize)
                .ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not a size like \"64MiB\" or 1048576"))),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            n if n > 0 && n % (1 << 30) == 0 => s.serialize_str(&format!("{}GiB", n >> 30)),
            n if n > 0 && n % (1 << 20) == 0 => s.serialize_str(&format!("{}MiB", n >> 20)),
            n if n > 0 && n % (1 << 10) == 0 => s.serialize_str(&format!("{}KiB", n >> 10)),
            n => s.serialize_u64(n),
        }
    }
}

/// A Postgres identifier walhook puts into SQL: lowercase letters, digits and `_`, starting
/// with a letter or `_`, at most 63 bytes. Keeping it this narrow means it never needs quoting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Identifier(String);

impl Identifier {
    /// Validates and wraps an identifier.
    pub fn new(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !s.as_bytes()[0].is_ascii_digit();
        if ok {
            Ok(Identifier(s.to_owned()))
        } else {
            Err(format!("{s:?} must be 1-63 characters of a-z, 0-9 and _, not starting with a digit"))
        }
    }
    /// The identifier text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Identifier {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Identifier::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(extra: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&format!("[database]\nurl = \"postgres://u:hunter2@h/db\"\n{extra}"))
    }

    #[test]
    fn defaults_load_and_redact_the_password() {
        let c = load("").unwrap();
        assert_eq!(c.dispatch.retry_schedule.len(), 9);
        assert_eq!(c.dispatch.retry_schedule[0].get(), Duration::from_secs(5));
        let shown = c.render_redacted();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("u:REDACTED@h"), "{shown}");
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn missing_url_is_named() {
        let e = Config::from_toml("").unwrap_err().to_string();
        assert!(e.contains("database.url"), "{e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = load("[dispatch]\nretries = 3\n").unwrap_err().to_string();
        assert!(e.contains("dispatch.retries") && e.contains("unknown"), "{e}");
    }

    #[test]
    fn bad_duration_is_named() {
        let e = load("[dispatch]\nrequest_timeout = \"soon\"\n").unwrap_err().to_string();
        assert!(e.contains("dispatch.request_timeout"), "{e}");
    }

    #[test]
    fn the_example_file_is_valid_and_documents_every_key() {
        let example = include_str!("../../config/walhook.example.toml");
        Config::from_toml(example).expect("the example configuration loads");
        let defaults: toml::Table = DEFAULT_TOML.parse().unwrap();
        for (section, keys) in defaults {
            assert!(example.contains(&format!("[{section}]")), "example lacks [{section}]");
            for key in keys.as_table().unwrap().keys() {
                let written = example.lines().any(|l| l.trim_start_matches("# ").starts_with(&format!("{key} =")));
                assert!(written, "example lacks {section}.{key}");
            }
        }
        for optional in ["ca_cert", "runtime_role", "jwt_hs256_secret", "encryption_key"] {
            assert!(example.contains(&format!("# {optional} =")), "example lacks {optional}");
        }
    }

    #[test]
    fn bad_identifier_is_named() {
        let e = load("[replication]\nslot = \"Bad-Slot\"\n").unwrap_err().to_string();
        assert!(e.contains("replication.slot"), "{e}");
    }

    #[test]
    fn memory_limit_takes_bytes_or_a_size_and_names_the_key() {
        assert_eq!(load("").unwrap().dispatch.memory_limit.get(), 16 * ByteSize::MIB);
        assert_eq!(load("[dispatch]\nmemory_limit = \"2MiB\"\n").unwrap().dispatch.memory_limit.get(), 2 << 20);
        assert_eq!(load("[dispatch]\nmemory_limit = 3145728\n").unwrap().dispatch.memory_limit.get(), 3 << 20);
        for bad in ["\"lots\"", "\"12 parsecs\"", "1024"] {
            let e = load(&format!("[dispatch]\nmemory_limit = {bad}\n")).unwrap_err().to_string();
            assert!(e.contains("dispatch.memory_limit"), "{bad}: {e}");
        }
        let shown = load("[dispatch]\nmemory_limit = \"512KiB\"\n").unwrap_err().to_string();
        assert!(shown.contains("at least 1MiB"), "{shown}");
        assert!(load("").unwrap().render_redacted().contains("memory_limit = \"16MiB\""));
    }
}
