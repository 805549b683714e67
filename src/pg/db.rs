//! Connections to the CRM database: a pool for walhook's own tables and dedicated sessions
//! for what must outlive a pooled checkout (the HA advisory lock).
//!
//! What must hold: TLS is used as the URL's `sslmode` asks (`require` verifies the server's
//! certificate against `database.ca_cert` or the Mozilla roots), over TCP; a Unix-socket URL
//! (`host=/var/run/postgresql`, for walhook on the database host) connects without TLS, as
//! PostgreSQL offers none there (`sslmode=require` over a socket fails saying so); connecting never blocks
//! forever; errors never carry the password; a pooled connection lives at most
//! `CONNECTION_LIFETIME` once idle, so the buffers it grew for a burst of large payloads
//! (tokio-postgres never shrinks them) are given back after the burst.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::DatabaseConfig;

/// Idle pooled connections older than this are closed by [`Db::close_old_connections`].
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How often [`Db::close_old_connections`] looks.
const LIFETIME_CHECK: Duration = Duration::from_secs(10);

/// An error and its causes on one line (`a: b: c`), skipping causes whose text repeats.
/// tokio-postgres and deadpool put the server's message in the cause, not the top error.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Database access errors; each keeps its cause.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// A statement or connection failed.
    #[error("database: {}", error_chain(.0))]
    Postgres(tokio_postgres::Error),
    /// No pooled connection could be had.
    #[error("database pool: {}", error_chain(.0))]
    Pool(deadpool_postgres::PoolError),
    /// The URL or TLS material is unusable.
    #[error("database configuration: {0}")]
    Config(String),
}

// Causes are part of each message (logs show `%error` only), so they are not also chained
// as `source`, which would print them twice in `{:#}` renderings.
impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        DbError::Postgres(e)
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        DbError::Pool(e)
    }
}

impl DbError {
    /// Whether retrying later may succeed (connection trouble rather than a bad statement):
    /// no answer at all, a closed connection, or a server that refuses for now.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Postgres(e) => e.is_closed() || e.code().is_none_or(refused_for_now),
            DbError::Pool(_) => true,
            DbError::Config(_) => false,
        }
    }
}

/// Codes of a server that cannot serve this connection now but may soon: a connection
/// exception (class 08), insufficient resources (class 53: too many connections, out of
/// memory, disk full), or an operator intervention that ends or refuses sessions (shutting
/// down, crashed, starting up or not accepting connections, idle session timeout). A dropped
/// database (57P04) is not one of them.
fn refused_for_now(code: &tokio_postgres::error::SqlState) -> bool {
    use tokio_postgres::error::SqlState;
    let class = &code.code()[..2];
    class == "08"
        || class == "53"
        || [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::IDLE_SESSION_TIMEOUT,
        ]
        .contains(code)
}

/// The database handle shared by every part of walhook.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    pg: Arc<tokio_postgres::Config>,
    tls: DbTls,
    ca_cert: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("status", &self.pool.status()).finish()
    }
}

impl Db {
    /// Builds the pool; nothing connects until first use.
    pub fn new(cfg: &DatabaseConfig) -> Result<Db, DbError> {
        let mut pg: tokio_postgres::Config =
            cfg.url.expose().parse().map_err(|e| DbError::Config(format!("database.url: {e}")))?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(10));
        }
        if pg.get_application_name().is_none() {
            pg.application_name("walhook");
        }
        // walhook's statements are small and frequent: JIT compilation only ever costs time.
        let options = format!("{} -c jit=off", pg.get_options().unwrap_or_default());
        pg.options(options.trim());
        pg.keepalives(true).keepalives_idle(Duration::from_secs(30));
        let tls = DbTls(MakeRustlsConnect::new(client_tls(cfg.ca_cert.as_deref())?));
        let manager =
            Manager::from_config(pg.clone(), tls.clone(), ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            // The most recently used connection first: spare ones go idle and are closed.
            .queue_mode(deadpool_postgres::QueueMode::Lifo)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(15)))
            .build()
            .map_err(|e| DbError::Config(e.to_string()))?;
        Ok(Db { pool, pg: Arc::new(pg), tls, ca_cert: cfg.ca_cert.clone() })
    }

    /// Closes idle pooled connections older than [`CONNECTION_LIFETIME`] every few seconds
    /// until `shutdown`: a connection keeps the buffer capacity its largest message needed
    /// (a store batch of payloads can be tens of MiB), so this is what returns it.
    pub async fn close_old_connections(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(LIFETIME_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    let closed = self.pool.retain(|_, m| m.age() < CONNECTION_LIFETIME).removed.len();
                    if closed > 0 {
                        tracing::debug!(closed, "closed idle database connections past their lifetime");
                    }
                }
            }
        }
    }

    /// A pooled connection.
    pub async fn get(&self) -> Result<deadpool_postgres::Object, DbError> {
        Ok(self.pool.get().await?)
    }

    /// A connection of its own, outside the pool; it closes when the client is dropped.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, DbError> {
        let (client, conn) = self.pg.connect(self.tls.clone()).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "dedicated database connection ended");
            }
        });
        Ok(client)
    }

    /// The parsed connection settings (host, port, user, database).
    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.pg
    }

    /// The replication connection's settings, derived from the same URL.
    pub fn replication_config(
        &self,
        slot: &str,
        publication: &str,
    ) -> Result<pgwire_replication::ReplicationConfig, DbError> {
        use pgwire_replication::{ReplicationConfig, TlsConfig};
        let (host, port) = match (self.pg.get_hosts().first(), self.pg.get_ports().first()) {
            (Some(tokio_postgres::config::Host::Tcp(h)), p) => (h.clone(), p.copied().unwrap_or(5432)),
            (Some(tokio_postgres::config::Host::Unix(dir)), p) => {
                (dir.display().to_string(), p.copied().unwrap_or(5432))
            }
            (None, _) => return Err(DbError::Config("database.url names no host".into())),
        };
        let user = self.pg.get_user().unwrap_or("postgres").to_owned();
        let password = self.pg.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
        let dbname = self.pg.get_dbname().unwrap_or(&user).to_owned();
        let unix = matches!(self.pg.get_hosts().first(), Some(tokio_postgres::config::Host::Unix(_)));
        let tls = match self.pg.get_ssl_mode() {
            // PostgreSQL offers no TLS on a Unix socket.
            SslMode::Disable | SslMode::Prefer if unix => TlsConfig::disabled(),
            SslMode::Disable => TlsConfig::disabled(),
            SslMode::Require => TlsConfig::verify_full(self.ca_cert.clone()),
            _ => {
                let mut t = TlsConfig::disabled();
                t.mode = pgwire_replication::SslMode::Prefer;
                t
            }
        };
        Ok(ReplicationConfig::new(host, user, password, dbname, slot, publication).with_port(port).with_tls(tls))
    }
}

/// rustls for TCP connections; for a Unix socket (no host name), a connector that is never
/// used for a handshake: PostgreSQL answers a socket's TLS request with "no", so `prefer`
/// goes on without TLS and `require` fails saying the server does not support it.
/// (`MakeRustlsConnect` alone refuses the empty name at once, whatever `sslmode` says.)
#[derive(Clone)]
struct DbTls(MakeRustlsConnect);

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for DbTls
where
    MakeRustlsConnect: tokio_postgres::tls::MakeTlsConnect<S>,
{
    type Stream = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::Stream;
    type TlsConnect = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::TlsConnect;
    type Error = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<Self::TlsConnect, Self::Error> {
        // (A Unix socket's connection has no host name.)
        self.0.make_tls_connect(if host.is_empty() { "localhost" } else { host })
    }
}

/// The rustls client configuration used for database connections.
fn client_tls(ca_cert: Option<&Path>) -> Result<rustls::ClientConfig, DbError> {
    crate::security::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    match ca_cert {
        Some(path) => {
            for cert in crate::security::tls::read_pem_certs(path)
                .map_err(|e| DbError::Config(format!("database.ca_cert: {e}")))?
            {
                roots.add(cert).map_err(|e| DbError::Config(format!("database.ca_cert: {e}")))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_chain_includes_causes_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        assert_eq!(super::error_chain(&Outer(std::io::Error::other("inner"))), "outer: inner");
    }

    #[test]
    fn a_server_refusing_for_now_is_told_apart_from_a_bad_statement() {
        use tokio_postgres::error::SqlState;
        for code in [
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CONNECTION_FAILURE,
            SqlState::DISK_FULL,
        ] {
            assert!(super::refused_for_now(&code), "{code:?}");
        }
        for code in [SqlState::UNDEFINED_TABLE, SqlState::INSUFFICIENT_PRIVILEGE, SqlState::UNDEFINED_DATABASE] {
            assert!(!super::refused_for_now(&code), "{code:?}");
        }
    }
}
