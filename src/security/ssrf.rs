//! Which addresses webhooks may be sent to.
//!
//! What must hold: only globally reachable unicast addresses are allowed (an allow-list, see
//! `ranges`), whatever IPv6 form embeds an IPv4 address, unless the address lies inside
//! `dispatch.allowed_cidrs` (an IPv4 range there also opens the IPv6 forms that reach that
//! address: mapped, compatible, SIIT, NAT64). The check is made on the addresses actually
//! connected to: literal IPs before sending, names where they are resolved, just before
//! connecting (`delivery::dispatch::connect`), so DNS answers cannot smuggle an internal
//! address past a check made earlier. The HTTP client uses no proxy, so no connection
//! bypasses that check.

use std::net::IpAddr;

use ipnet::IpNet;

use super::ranges::{embedded_v4, not_global};

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
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        if self.allowed.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        if let IpAddr::V6(v6) = ip {
            if let Some((_, v4s)) = embedded_v4(v6).filter(|(kind, _)| kind.reaches_v4()) {
                if v4s.iter().all(|v4| self.allowed.iter().any(|n| n.contains(&IpAddr::V4(*v4)))) {
                    return Ok(());
                }
            }
        }
        match not_global(ip) {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }
}

/// A name resolved only to forbidden addresses.
#[derive(Debug, thiserror::Error)]
#[error("refused: {host} resolves only to addresses webhooks may not target ({reason})")]
pub struct Refused {
    /// The name.
    pub host: String,
    /// Why the last address was refused.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: &str) -> bool {
        AddressPolicy::default().check(s.parse().unwrap()).is_err()
    }

    fn accepted<'a>(ips: &[&'a str]) -> Vec<&'a str> {
        ips.iter().copied().filter(|ip| !refused(ip)).collect()
    }

    /// What held before the allow-list (and must keep holding).
    #[test]
    fn internal_ranges_are_refused() {
        let ips = [
            "127.0.0.1",
            "127.255.255.254",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "239.255.255.255",
            "240.0.0.1",
            "255.255.255.255",
            "192.0.0.192",
            "198.18.0.1",
            "::1",
            "::",
            "fe80::1",
            "fec0::1",
            "fd00:ec2::254",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::7f00:1",
        ];
        assert!(accepted(&ips).is_empty(), "accepted: {:?}", accepted(&ips));
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "172.32.0.1", "::ffff:8.8.8.8", "64:ff9b::808:808"] {
            assert!(!refused(ip), "{ip} is public");
        }
    }

    /// Every literal spelling of loopback in a URL reaches the check as an address.
    #[test]
    fn loopback_spellings_are_refused() {
        for host in
            ["127.1", "2130706433", "0x7f.0.0.1", "0177.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]"]
        {
            let url = url::Url::parse(&format!("https://{host}/")).unwrap();
            let ip: IpAddr = match url.host() {
                Some(url::Host::Ipv4(v4)) => v4.into(),
                Some(url::Host::Ipv6(v6)) => v6.into(),
                other => panic!("{host} parsed as {other:?}"),
            };
            assert!(refused(&ip.to_string()), "{host} ({ip}) must be refused");
        }
    }

    /// The ranges issue 13 found accepted at create and at connect.
    #[test]
    fn issue_13_ranges_are_refused() {
        let ips = [
            "::ffff:0:127.0.0.1",
            "::ffff:0:a00:1",
            "64:ff9b:1::7f00:1",
            "64:ff9b:1::808:808",
            "2002:7f00:1::1",
            "2002:a00:1::1",
            "2002:c0a8:101::1",
            "2002:a9fe:a9fe::1",
            "2001:0:4136:e378:8000:63bf:80ff:fffe",
            "2001:0:7f00:1:8000:63bf:f7f7:f7f7",
            "2001:2::1",
            "2001:10::1",
            "100::1",
            "100::ffff:ffff:ffff:ffff",
            "2001:db8::1",
            "2001:db8:ffff::1",
            "3fff::1",
            "4000::1",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.1",
            "192.88.99.1",
        ];
        assert!(accepted(&ips).is_empty(), "accepted: {:?}", accepted(&ips));
    }

    #[test]
    fn allowed_cidrs_open_a_range_in_both_forms() {
        let p = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap(), "2001:db8::/32".parse().unwrap()]);
        for ok in
            ["127.0.0.1", "::ffff:127.0.0.1", "::ffff:0:127.0.0.1", "::127.0.0.1", "64:ff9b::7f00:1", "2001:db8::1"]
        {
            assert!(p.check(ok.parse().unwrap()).is_ok(), "{ok} is allowed");
        }
        // 6to4 and Teredo reach a relay, not the embedded address: the IPv4 range does not open them.
        for no in ["10.0.0.1", "::1", "2002:7f00:1::1", "2001:0:4136:e378:8000:63bf:80ff:fffe"] {
            assert!(p.check(no.parse().unwrap()).is_err(), "{no} is not allowed");
        }
    }
}
