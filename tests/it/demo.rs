//! `walhook demo`, run as the real binary: it tells its tour and its summary, and shows
//! walhook's own lines only (no server notices, no shutdown chatter from the libraries).

use std::process::{Command, Stdio};
use std::time::Duration;

/// Lines a user of the demo must never see: they come from the client library, the pool
/// or the throwaway server, not from walhook.
const NOISE: &[&str] =
    &["NOTICE:", "terminating connection", "Connection error", "tokio_postgres", "deadpool", "immediate shutdown"];

/// Runs `walhook demo` to its end (at most 120 s); `RUST_LOG` as given, or unset.
fn run_demo(rust_log: Option<&str>) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walhook"));
    cmd.arg("demo").env_remove("RUST_LOG").env_remove("WALHOOK_TEST_LOG").env("NO_COLOR", "1");
    if let Some(filter) = rust_log {
        cmd.env("RUST_LOG", filter);
    }
    let child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn walhook demo");
    let pid = child.id();
    // The demo stops by itself; a deadline keeps a hung one from hanging the suite.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let out = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(out) => out.expect("demo output"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("walhook demo did not finish within 120 s");
        }
    };
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn demo_shows_its_tour_and_summary_and_no_library_noise() {
    let (ok, stdout, stderr) = run_demo(None);
    let all = format!("{stdout}\n--- stderr ---\n{stderr}");
    assert!(ok, "demo failed:\n{all}");

    assert!(stdout.contains("6 webhooks received, 6 with a valid signature, 0 from account B"), "{all}");
    assert!(stdout.contains("done: the throwaway cluster is gone."), "{all}");
    for noise in NOISE {
        assert!(!all.contains(noise), "the demo printed library noise {noise:?}:\n{all}");
    }
    // Where the server's own log went is said once, so a curious user can read it.
    assert_eq!(stdout.matches("server log:").count(), 1, "{all}");
}

/// With the libraries' logs let through, nothing is cut off by the cluster's shutdown: the
/// demo closes every connection (its own and walhook's pool) before it stops the cluster.
#[test]
fn demo_closes_its_connections_before_its_cluster_stops() {
    let (ok, stdout, stderr) = run_demo(Some("warn,tokio_postgres=info,deadpool=info"));
    let all = format!("{stdout}\n--- stderr ---\n{stderr}");
    assert!(ok, "demo failed:\n{all}");
    for cut_off in ["terminating connection", "Connection error", "connection closed"] {
        assert!(!stderr.contains(cut_off), "a connection was cut off by the cluster's shutdown ({cut_off:?}):\n{all}");
    }
}
