//! A throwaway PostgreSQL cluster (`wal_level = logical`) for the demo, the tests and the
//! benchmark, built from the machine's PostgreSQL server binaries (`PGBIN` selects them), and
//! physical standbys of it for the failover tests.
//!
//! What must hold: it never touches a real cluster (own data directory, own port, loopback
//! only); when run as root it drops to the `postgres` OS user, because initdb refuses root;
//! it is removed when dropped, and a watchdog removes it if this process dies without
//! dropping it (a test binary's statics are never dropped).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Why a cluster could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// initdb/pg_ctl are not installed.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found: install them \
         (Debian/Ubuntu: `apt-get install postgresql`, which provides \
         /usr/lib/postgresql/<version>/bin) or point PGBIN at their directory"
    )]
    BinariesMissing,
    /// Running as root, but there is no unprivileged user to run PostgreSQL as.
    #[error("running as root and there is no `postgres` OS user to run PostgreSQL as (initdb refuses root)")]
    NoPostgresUser,
    /// A step failed.
    #[error("{step}: {detail}")]
    Step {
        /// What was being done.
        step: &'static str,
        /// Output or error of the step.
        detail: String,
    },
}

/// Settings of a throwaway cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Keep `fsync` on (benchmarks); off makes tests faster.
    pub fsync: bool,
    /// Extra `postgresql.conf` lines.
    pub extra_conf: Vec<String>,
}

/// A running throwaway cluster.
#[derive(Debug)]
pub struct TempCluster {
    root: PathBuf,
    bindir: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
}

impl TempCluster {
    /// Creates and starts a cluster on a free loopback port.
    pub fn start(opts: &ClusterOptions) -> Result<TempCluster, ClusterError> {
        let bindir = find_bindir().ok_or(ClusterError::BinariesMissing)?;
        let run_as = if is_root() { Some(postgres_user().ok_or(ClusterError::NoPostgresUser)?) } else { None };
        let root = std::env::temp_dir().join(format!("walhook-pg-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&root).map_err(|e| step("create data directory", e))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&root, Some(uid), Some(gid)).map_err(|e| step("chown data directory", e))?;
        }
        let port = free_port()?;
        let cluster = TempCluster { root, bindir, port, run_as };
        cluster.spawn_watchdog()?;
        cluster.run(
            "initdb",
            Command::new(cluster.bin("initdb")).args(["-D", cluster.data_dir().to_str().unwrap_or_default()]).args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]),
        )?;
        let mut conf = format!(
            "\n# walhook throwaway cluster\nlisten_addresses = '127.0.0.1'\nport = {port}\n\
             unix_socket_directories = '{}'\nwal_level = logical\nmax_replication_slots = 200\n\
             max_wal_senders = 200\nmax_connections = 400\nshared_buffers = 128MB\n\
             fsync = {}\nfull_page_writes = {}\n\
             log_min_messages = warning\nlog_line_prefix = '%m [%p] %a '\n",
            cluster.root.display(),
            on_off(opts.fsync),
            on_off(opts.fsync),
        );
        for line in &opts.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        let conf_path = cluster.data_dir().join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).map_err(|e| step("read postgresql.conf", e))?;
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing).map_err(|e| step("write postgresql.conf", e))?;
        cluster.pg_start()?;
        Ok(cluster)
    }

    /// Creates a physical standby of this (running) cluster and starts it: a base backup
    /// streaming from this one through physical slot `slot` (created here), with `extra_conf`
    /// lines read last (`sync_replication_slots`, `primary_conninfo` with a dbname, ...).
    pub fn start_standby(&self, slot: &str, extra_conf: &[String]) -> Result<TempCluster, ClusterError> {
        let root = std::env::temp_dir().join(format!("walhook-pg-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&root).map_err(|e| step("create data directory", e))?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&root, Some(uid), Some(gid)).map_err(|e| step("chown data directory", e))?;
        }
        let standby = TempCluster { root, bindir: self.bindir.clone(), port: free_port()?, run_as: self.run_as };
        standby.spawn_watchdog()?;
        let primary_port = self.port.to_string();
        standby.run(
            "pg_basebackup",
            Command::new(standby.bin("pg_basebackup"))
                .args(["-D", standby.data_dir().to_str().unwrap_or_default()])
                .args(["-h", "127.0.0.1", "-p", &primary_port, "-U", "postgres"])
                .args(["-X", "stream", "-c", "fast", "-R", "-C", "-S", slot, "--no-sync"]),
        )?;
        // postgresql.auto.conf is read last: its lines win over the primary's copied settings.
        let mut conf = format!(
            "\n# walhook throwaway standby\nport = {}\nunix_socket_directories = '{}'\n",
            standby.port,
            standby.root.display()
        );
        for line in extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        let auto = standby.data_dir().join("postgresql.auto.conf");
        let mut existing = std::fs::read_to_string(&auto).map_err(|e| step("read postgresql.auto.conf", e))?;
        existing.push_str(&conf);
        std::fs::write(&auto, existing).map_err(|e| step("write postgresql.auto.conf", e))?;
        standby.pg_start()?;
        Ok(standby)
    }

    /// Promotes a standby to a primary (waits until it accepts writes).
    pub fn promote(&self) -> Result<(), ClusterError> {
        self.run(
            "pg_ctl promote",
            Command::new(self.bin("pg_ctl")).args([
                "-D",
                self.data_dir().to_str().unwrap_or_default(),
                "-w",
                "promote",
            ]),
        )
    }

    /// The port the cluster listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory of the cluster's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// The directory holding the server binaries (for `pg_recvlogical` and friends).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// A URL for `db` as the superuser `postgres` (trust authentication).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Starts a stopped cluster.
    pub fn pg_start(&self) -> Result<(), ClusterError> {
        let log = self.log_path();
        self.run(
            "pg_ctl start",
            Command::new(self.bin("pg_ctl"))
                .args(["-D", self.data_dir().to_str().unwrap_or_default(), "-w", "-t", "60"])
                .args(["-l", log.to_str().unwrap_or_default(), "start"]),
        )
    }

    /// Stops the cluster; `immediate` is a crash (no checkpoint), otherwise a fast shutdown.
    pub fn pg_stop(&self, immediate: bool) -> Result<(), ClusterError> {
        let mode = if immediate { "immediate" } else { "fast" };
        self.run(
            "pg_ctl stop",
            Command::new(self.bin("pg_ctl")).args([
                "-D",
                self.data_dir().to_str().unwrap_or_default(),
                "-w",
                "-m",
                mode,
                "stop",
            ]),
        )
    }

    /// Creates database `name` and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String, ClusterError> {
        let (client, conn) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
            .await
            .map_err(|e| step("connect", e))?;
        tokio::spawn(conn);
        client.batch_execute(&format!("CREATE DATABASE \"{name}\"")).await.map_err(|e| step("create database", e))?;
        Ok(self.url(name))
    }

    /// The server log so far (for diagnosing a failed test).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The file the server writes its log to (removed with the cluster).
    pub fn log_path(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }

    fn run(&self, what: &'static str, cmd: &mut Command) -> Result<(), ClusterError> {
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid).env("HOME", &self.root);
        }
        let out = cmd.current_dir(&self.root).stdin(Stdio::null()).output().map_err(|e| step(what, e))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ClusterError::Step {
                step: what,
                detail: format!(
                    "{}{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    self.log()
                ),
            })
        }
    }

    /// A process in its own group that stops and removes the cluster once we are gone.
    fn spawn_watchdog(&self) -> Result<(), ClusterError> {
        let script = format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; \"{pg_ctl}\" -D \"{data}\" -m immediate stop >/dev/null 2>&1; rm -rf \"{root}\"",
            pid = std::process::id(),
            pg_ctl = self.bin("pg_ctl").display(),
            data = self.data_dir().display(),
            root = self.root.display(),
        );
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", &script]).process_group(0).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd.spawn().map_err(|e| step("start watchdog", e))?;
        Ok(())
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        let _ = self.pg_stop(true);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn step(step: &'static str, e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Step { step, detail: e.to_string() }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn free_port() -> Result<u16, ClusterError> {
    super::port::free().map_err(|e| step("find a free port", e))
}

/// `PGBIN`, `pg_config --bindir` (if it has initdb), or the newest
/// `/usr/lib/postgresql/<v>/bin`.
fn find_bindir() -> Option<PathBuf> {
    let has_initdb = |p: &Path| p.join("initdb").is_file() && p.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("PGBIN").map(PathBuf::from) {
        return has_initdb(&dir).then_some(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_initdb(&dir) {
            return Some(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_initdb(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// uid and gid of the `postgres` OS user, from /etc/passwd.
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() > 3 && f[0] == "postgres").then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}
