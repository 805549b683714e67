//! Logging: text or JSON lines on stderr, filtered by `log.level` or `RUST_LOG`.
//!
//! What must hold: logs never carry secrets (tokio-postgres, which logs statement parameters
//! at debug level, is capped at info unless the filter names it); text logs carry ANSI colour
//! only on a terminal and never with `NO_COLOR` set.

use std::io::IsTerminal;

use crate::config::{Config, LogFormat};

/// Logging as configured; `RUST_LOG` wins over `log.level`. tokio-postgres logs statement
/// parameters (signing secrets among them) at debug level, so it is capped at info unless
/// the filter names it explicitly.
pub fn init_logging(cfg: &Config) {
    let mut directives =
        std::env::var("RUST_LOG").ok().filter(|s| !s.trim().is_empty()).unwrap_or_else(|| cfg.log.level.clone());
    if !directives.contains("tokio_postgres") {
        directives.push_str(",tokio_postgres=info");
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{},tokio_postgres=info", cfg.log.level)));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match cfg.log.format {
        LogFormat::Json => builder.json().flatten_event(true).with_span_list(false).try_init(),
        LogFormat::Text => {
            let colour = use_colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR"));
            builder.with_ansi(colour).try_init()
        }
    };
}

/// Whether text logs get ANSI colour: only on a terminal (a file, a pipe or a container log
/// gets plain text), and never with `NO_COLOR` set to anything but the empty string.
fn use_colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::use_colour;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(!use_colour(false, None), "a file, pipe or container log gets no escapes");
        assert!(!use_colour(true, Some("1".into())), "NO_COLOR turns colour off");
        assert!(use_colour(true, Some("".into())), "an empty NO_COLOR is unset (no-color.org)");
        assert!(!use_colour(false, Some("1".into())));
    }
}
