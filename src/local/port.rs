//! Free TCP ports for listeners started later by number: a throwaway cluster, walhook's own
//! listeners in the demo and the tests.
//!
//! What must hold: a port handed out here lies outside the kernel's ephemeral range and is
//! not handed out twice by one process. The port `bind(":0")` reports comes from the
//! ephemeral range, so between closing that probe and the real listener binding it, any
//! outgoing connection (a database session, an HTTP client) may take it as its local port,
//! and the listener fails with `AddrInUse`.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out: above the well-known and most registered service ports.
const LOW: u32 = 10_240;

/// A port on 127.0.0.1 that nothing listened on a moment ago, from outside the ephemeral
/// range. Each process starts at its own offset, so concurrent test binaries rarely meet.
pub fn free() -> std::io::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let (low, high) = usable_range();
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let seed = std::process::id().wrapping_mul(7_919).wrapping_add(nanos);
        let _ = NEXT.compare_exchange(u32::MAX, seed % (high - low + 1), Ordering::Relaxed, Ordering::Relaxed);
    }
    pick(&NEXT, low, high)
}

/// The first port from `next` on (wrapping within `low..=high`) that 127.0.0.1 can bind.
fn pick(next: &AtomicU32, low: u32, high: u32) -> std::io::Result<u16> {
    let span = high - low + 1;
    for _ in 0..span {
        let port = (low + next.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, format!("no free port in {low}..={high}")))
}

/// The ports below the ephemeral range (`net.ipv4.ip_local_port_range`), or above it when
/// it starts too low to leave room, or everything from `LOW` when it leaves no room at all.
fn usable_range() -> (u32, u32) {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999));
    match ephemeral {
        (lo, _) if lo >= LOW + 4_096 => (LOW, lo - 1),
        (_, hi) if hi + 4_096 <= 65_535 => (hi + 1, 65_535),
        _ => (LOW, 65_535),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_outside_the_ephemeral_range() {
        let (low, high) = usable_range();
        let ports: Vec<u16> = (0..200).map(|_| free().unwrap()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len());
        assert!(ports.iter().all(|&p| (low..=high).contains(&u32::from(p))), "{ports:?} not in {low}..={high}");
        let ephemeral = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert!(!(low..=high).contains(&u32::from(ephemeral)), "port 0 gave {ephemeral}, inside {low}..={high}");
    }

    #[test]
    fn a_port_in_use_is_skipped() {
        let held = TcpListener::bind(("127.0.0.1", free().unwrap())).unwrap();
        let port = u32::from(held.local_addr().unwrap().port());
        assert!(pick(&AtomicU32::new(0), port, port).is_err(), "handed out {port}, which is in use");
        drop(held);
        assert_eq!(pick(&AtomicU32::new(0), port, port).unwrap(), port as u16);
    }
}
