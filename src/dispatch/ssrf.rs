//! Which addresses webhooks may be sent to.
//!
//! What must hold: a target in a loopback, private, link-local, CGNAT, multicast, reserved or
//! unspecified range, in an IPv4-mapped/compatible/NAT64 IPv6 form of one, or at a cloud
//! metadata address, is refused unless it lies inside `dispatch.allowed_cidrs`. The check is
//! made on the addresses actually connected to: literal IPs before sending, names inside the
//! resolver (so DNS answers cannot smuggle an internal address past a check made earlier).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// Decides whether an address may be connected to.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allowed: Vec<IpNet>,
}

impl AddressPolicy {
    /// A policy allowing the otherwise forbidden `allowed` ranges.
    pub fn new(allowed: Vec<IpNet>) -> Self {
        AddressPolicy { allowed }
    }

    /// `Err(reason)` when `ip` may not be connected to.
    pub fn check(&self, ip: IpAddr) -> Result<(), &'static str> {
        let embedded = embedded_v4(ip);
        if self.allowed.iter().any(|n| n.contains(&ip) || embedded.is_some_and(|v4| n.contains(&IpAddr::V4(v4)))) {
            return Ok(());
        }
        match forbidden_reason(ip) {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }
}

/// The IPv4 address inside an IPv4-mapped, -compatible or NAT64 IPv6 address.
fn embedded_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return None };
    let s = v6.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(tail), // ::ffff:a.b.c.d
        [0, 0, 0, 0, 0, 0, _, _] if !(s[6] == 0 && s[7] <= 1) => Some(tail), // ::a.b.c.d
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail), // 64:ff9b::/96
        _ => None,
    }
}

/// Why `ip` is not a public unicast address, or `None` when it is one.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(ip) {
                return forbidden_v4(v4).map(|_| "an IPv6 form of a forbidden IPv4 address");
            }
            forbidden_v6(v6)
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, _, _) => "unspecified (0.0.0.0/8)",
        (127, _, _) => "loopback",
        (10, _, _) | (172, 16..=31, _) | (192, 168, _) => "private",
        (169, 254, _) => "link-local (cloud metadata lives here)",
        (100, 64..=127, _) => "carrier-grade NAT (100.64.0.0/10)",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24, cloud metadata)",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved or broadcast",
        _ => return None,
    })
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s0 = ip.segments()[0];
    Some(if ip.is_unspecified() {
        "unspecified (::)"
    } else if ip.is_loopback() {
        "loopback (::1)"
    } else if s0 & 0xfe00 == 0xfc00 {
        "unique local (fc00::/7, cloud metadata lives here)"
    } else if s0 & 0xffc0 == 0xfe80 || s0 & 0xffc0 == 0xfec0 {
        "link-local"
    } else if s0 & 0xff00 == 0xff00 {
        "multicast"
    } else if ip.segments()[..6] == [0; 6] {
        "IPv4-compatible"
    } else {
        return None;
    })
}

/// reqwest resolver that drops forbidden addresses from every DNS answer.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    policy: Arc<AddressPolicy>,
}

impl GuardedResolver {
    /// A resolver enforcing `policy`.
    pub fn new(policy: Arc<AddressPolicy>) -> Self {
        GuardedResolver { policy }
    }
}

/// A name resolved only to forbidden addresses.
#[derive(Debug, thiserror::Error)]
#[error("refused: {host} resolves only to addresses webhooks may not target ({reason})")]
pub struct Refused {
    /// The name.
    pub host: String,
    /// Why the first address was refused.
    pub reason: &'static str,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut reason = "no address";
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match policy.check(a.ip()) {
                    Ok(()) => true,
                    Err(r) => {
                        reason = r;
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                return Err(Box::new(Refused { host, reason }) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: &str) -> bool {
        AddressPolicy::default().check(s.parse().unwrap()).is_err()
    }

    #[test]
    fn internal_ranges_are_refused() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.0.192",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(refused(ip), "{ip} must be refused");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "172.32.0.1"] {
            assert!(!refused(ip), "{ip} is public");
        }
    }

    #[test]
    fn allowed_cidrs_open_a_range_in_both_forms() {
        let p = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(p.check("127.0.0.1".parse().unwrap()).is_ok());
        assert!(p.check("::ffff:127.0.0.1".parse().unwrap()).is_ok());
        assert!(p.check("10.0.0.1".parse().unwrap()).is_err());
    }
}
