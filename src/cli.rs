//! Command line: `walhook run | migrate | check-config | slot-reset | demo`.
//!
//! What must hold: configuration errors are printed with the key named and exit non-zero
//! before anything connects; SIGTERM/SIGINT start a graceful shutdown and a second signal
//! exits at once; logs never carry secrets; text logs carry ANSI colour only on a terminal
//! and never with `NO_COLOR` set.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ops::logging::init_logging;

/// walhook: PostgreSQL changes as signed webhooks.
#[derive(Debug, Parser)]
#[command(name = "walhook", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Stream the slot and deliver webhooks until SIGTERM.
    Run {
        /// TOML configuration file (environment variables WALHOOK_<SECTION>__<KEY> override it).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Create or upgrade walhook's schema, the publication and the replica identity.
    Migrate {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the effective configuration, secrets redacted.
    CheckConfig {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Replace a lost (missing or invalidated) replication slot: record the gap of changes
    /// not delivered in walhook.replication_gaps and create a new slot. Refuses a healthy slot.
    SlotReset {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// A self-contained tour: throwaway Postgres, sample CRM, local HTTPS receiver.
    Demo {
        /// Keep running (and printing webhooks) until Ctrl-C after the tour.
        #[arg(long)]
        stay: bool,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walhook: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli.command));
    // Whatever is still running (a request abandoned at the grace, a blocking DNS lookup)
    // must not hold the exit past `shutdown.grace`: give it a moment, then go.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("walhook: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::CheckConfig { config } => {
            let cfg = Config::load(config.as_deref())?;
            print!("{}", cfg.render_redacted());
            Ok(())
        }
        Command::Migrate { config } => {
            let cfg = Config::load(config.as_deref())?;
            init_logging(&cfg);
            let db = crate::pg::db::Db::new(&cfg.database)?;
            let migrated = crate::app::migrate(&db, &cfg).await.context("migrate")?;
            let report = &migrated.schema;
            println!(
                "walhook schema at version {}; applied {:?}; replica identity FULL set on {:?}; publication {} {}",
                crate::pg::migrate::latest_version(),
                report.applied,
                report.replica_identity_set,
                cfg.replication.publication,
                if report.publication_created {
                    "created".to_string()
                } else if report.publication_added.is_empty() && report.publication_restored.is_empty() {
                    "up to date".to_string()
                } else {
                    format!("extended with {:?}, restored {:?}", report.publication_added, report.publication_restored)
                }
            );
            let slot = &cfg.replication.slot;
            match migrated.slot {
                crate::source::slot::Prepared::Created { lsn, failover } => {
                    println!(
                        "created replication slot {slot} at {lsn}{}: every change committed from now on is delivered",
                        if failover { " (failover = true)" } else { "" }
                    );
                    if failover {
                        println!("{}", standby_check(slot.as_str()));
                    }
                }
                crate::source::slot::Prepared::Adopted { lsn } => {
                    println!("adopted the existing replication slot {slot} at {lsn}")
                }
                crate::source::slot::Prepared::Recorded => println!("replication slot {slot}: walhook's already"),
            }
            Ok(())
        }
        Command::Run { config } => {
            let cfg = Arc::new(Config::load(config.as_deref())?);
            init_logging(&cfg);
            let shutdown = CancellationToken::new();
            tokio::spawn(watch_signals(shutdown.clone()));
            tracing::info!(version = env!("CARGO_PKG_VERSION"), "walhook starting");
            crate::app::run(cfg, shutdown).await?;
            tracing::info!("walhook stopped");
            Ok(())
        }
        Command::SlotReset { config } => {
            let cfg = Config::load(config.as_deref())?;
            init_logging(&cfg);
            let db = crate::pg::db::Db::new(&cfg.database)?;
            let report = crate::source::slot::reset(&db, &cfg).await.context("slot-reset")?;
            print_reset(&report);
            Ok(())
        }
        #[cfg(feature = "demo")]
        Command::Demo { stay } => crate::local::demo::run(stay).await,
        #[cfg(not(feature = "demo"))]
        Command::Demo { .. } => anyhow::bail!(
            "this walhook was built without the demo (a production build: --no-default-features); \
             `cargo run --release -- demo` from the source tree runs it"
        ),
    }
}

fn print_reset(r: &crate::source::slot::ResetReport) {
    if r.dropped_invalidated {
        println!("dropped the invalidated replication slot {}", r.slot);
    }
    if r.released_held > 0 {
        println!(
            "released {} deliveries that webhooks-recover, -redeliver or -replay requeued while the slot was lost",
            r.released_held
        );
    }
    if r.adopted {
        println!(
            "adopted replication slot {}, which walhook did not create, at its confirmed position {}",
            r.slot, r.start_lsn
        );
    } else {
        println!(
            "created replication slot {} at {}{}",
            r.slot,
            r.start_lsn,
            if r.failover {
                " with failover = true (PostgreSQL 17+: carried to a standby with sync_replication_slots)"
            } else {
                ""
            }
        );
        if r.failover {
            println!("{}", standby_check(&r.slot));
        }
    }
    match &r.gap {
        Some(g) => println!(
            "recorded gap {} in walhook.replication_gaps: from {} ({}) to {} ({}); changes committed in between \
             were not delivered: see docs/operations.md, WalhookReplicationSlotLost, for how to repair them",
            g.id,
            g.from_lsn,
            g.from_time.as_deref().unwrap_or("unknown time"),
            g.to_lsn,
            g.to_time
        ),
        None => println!("walhook had not streamed from this slot before: no gap to record"),
    }
    println!("a waiting walhook resumes streaming from the slot by itself");
}

/// First SIGTERM/SIGINT: graceful shutdown. Second: exit at once.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("shutting down (a second signal exits at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: exiting now");
    std::process::exit(130);
}

/// What to check on a standby before relying on a failover after a slot was created.
fn standby_check(slot: &str) -> String {
    format!(
        "a standby carries the new slot only once walhook run has streamed from it: until then a failover loses it \
         (walhook then reports it lost). Before relying on a failover, check on the standby: SELECT synced, \
         temporary FROM pg_replication_slots WHERE slot_name = '{slot}' (synced and not temporary)"
    )
}
