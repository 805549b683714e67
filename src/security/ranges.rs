//! Which IP addresses are globally reachable unicast addresses, per the IANA IPv4 and IPv6
//! special-purpose address registries.
//!
//! What must hold: this is an allow-list. An IPv6 address can only be global inside
//! 2000::/3, and there only outside the special-purpose blocks that are not globally
//! reachable; an IPv4 address is global outside every special-purpose, multicast and
//! reserved block. Every IPv6 form that embeds an IPv4 address (mapped, compatible, SIIT,
//! NAT64, 6to4, Teredo) is decoded and the embedded address judged too, so no spelling of
//! an internal IPv4 address passes. Blocks that are globally reachable only for anycast
//! infrastructure (PCP, TURN, AMT, AS112 inside 192.0.0.0/24 and 2001::/23) are refused as
//! well: no webhook receiver lives there.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// How an IPv6 address carries an IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Embedding {
    /// `::ffff:a.b.c.d` (a socket connects to the IPv4 address itself).
    Mapped,
    /// `::a.b.c.d`, deprecated.
    Compatible,
    /// `::ffff:0:a.b.c.d` (SIIT, RFC 2765).
    Siit,
    /// `64:ff9b::a.b.c.d`, the well-known NAT64 prefix.
    Nat64,
    /// `64:ff9b:1::/48`, the local-use NAT64 prefix (address in the last 32 bits).
    LocalNat64,
    /// `2002:AABB:CCDD::/48`, 6to4.
    SixToFour,
    /// `2001:0:SSSS:SSSS:…:CCCC:CCCC`, Teredo: server, then client XOR ffff:ffff.
    Teredo,
}

impl Embedding {
    fn name(self) -> &'static str {
        match self {
            Embedding::Mapped => "IPv4-mapped",
            Embedding::Compatible => "IPv4-compatible",
            Embedding::Siit => "SIIT",
            Embedding::Nat64 => "NAT64",
            Embedding::LocalNat64 => "local-use NAT64",
            Embedding::SixToFour => "6to4",
            Embedding::Teredo => "Teredo",
        }
    }

    /// Whether a connection to the IPv6 address reaches the embedded IPv4 address itself
    /// (so `dispatch.allowed_cidrs` for that IPv4 address applies).
    pub fn reaches_v4(self) -> bool {
        matches!(self, Embedding::Mapped | Embedding::Compatible | Embedding::Siit | Embedding::Nat64)
    }
}

/// The IPv4 addresses embedded in `ip`, with how they are embedded (Teredo carries two).
pub fn embedded_v4(ip: Ipv6Addr) -> Option<(Embedding, Vec<Ipv4Addr>)> {
    let s = ip.segments();
    let o = ip.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    let kind = match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Embedding::Mapped,
        [0, 0, 0, 0, 0xffff, 0, _, _] => Embedding::Siit,
        // :: and ::1 are themselves, not IPv4 0.0.0.0/0.0.0.1.
        [0, 0, 0, 0, 0, 0, 0, 0..=1] => return None,
        [0, 0, 0, 0, 0, 0, _, _] => Embedding::Compatible,
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Embedding::Nat64,
        [0x64, 0xff9b, 1, ..] => Embedding::LocalNat64,
        [0x2002, ..] => {
            return Some((Embedding::SixToFour, vec![Ipv4Addr::new(o[2], o[3], o[4], o[5])]));
        }
        [0x2001, 0, ..] => {
            let server = Ipv4Addr::new(o[4], o[5], o[6], o[7]);
            let client = Ipv4Addr::from(!u32::from(tail));
            return Some((Embedding::Teredo, vec![server, client]));
        }
        _ => return None,
    };
    Some((kind, vec![tail]))
}

/// Why `ip` is not a globally reachable unicast address, or `None` when it is one.
pub fn not_global(ip: IpAddr) -> Option<String> {
    match ip {
        IpAddr::V4(v4) => not_global_v4(v4).map(str::to_owned),
        IpAddr::V6(v6) => not_global_v6(v6),
    }
}

/// IPv4: everything outside the special-purpose, multicast and reserved blocks.
pub fn not_global_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, _, _) => "\"this network\" (0.0.0.0/8)",
        (10, _, _) | (172, 16..=31, _) | (192, 168, _) => "private",
        (100, 64..=127, _) => "carrier-grade NAT (100.64.0.0/10)",
        (127, _, _) => "loopback",
        (169, 254, _) => "link-local (169.254.0.0/16, cloud metadata lives here)",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24, cloud metadata)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation (TEST-NET)",
        (192, 88, 99) => "deprecated 6to4 relay anycast (192.88.99.0/24)",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved or broadcast (240.0.0.0/4)",
        _ => return None,
    })
}

/// IPv6: only 2000::/3 minus its special-purpose blocks, and IPv4-embedding forms only when
/// their IPv4 addresses are global.
fn not_global_v6(ip: Ipv6Addr) -> Option<String> {
    if let Some((kind, v4s)) = embedded_v4(ip) {
        for v4 in &v4s {
            if let Some(why) = not_global_v4(*v4) {
                return Some(format!("the {} form of {v4}, which is {why}", kind.name()));
            }
        }
        return match kind {
            // A connection goes to the (global) IPv4 address itself, or through a NAT64
            // gateway, a 6to4 or a Teredo relay to it.
            Embedding::Mapped | Embedding::Nat64 | Embedding::SixToFour | Embedding::Teredo => None,
            Embedding::Compatible | Embedding::Siit | Embedding::LocalNat64 => {
                Some(format!("{} (not globally routable)", kind.name()))
            }
        };
    }
    let s = ip.segments();
    let why = if ip.is_unspecified() {
        "unspecified (::)"
    } else if ip.is_loopback() {
        "loopback (::1)"
    } else if s[0] & 0xe000 != 0x2000 {
        match s[0] {
            0x0100 if s[1..4] == [0, 0, 0] => "discard-only (100::/64)",
            x if x & 0xfe00 == 0xfc00 => "unique local (fc00::/7, cloud metadata lives here)",
            x if x & 0xffc0 == 0xfe80 => "link-local (fe80::/10)",
            x if x & 0xffc0 == 0xfec0 => "site-local (fec0::/10)",
            x if x & 0xff00 == 0xff00 => "multicast",
            _ => "not global unicast (outside 2000::/3)",
        }
    } else if s[0] == 0x2001 && s[1] < 0x0200 {
        "IETF protocol assignments (2001::/23)"
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        "documentation (2001:db8::/32)"
    } else if s[0] & 0xfff0 == 0x3ff0 {
        "documentation (3fff::/20)"
    } else {
        return None;
    };
    Some(why.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn global(s: &str) -> bool {
        not_global(s.parse().unwrap()).is_none()
    }

    #[test]
    fn embedded_addresses_are_decoded() {
        let v4 = |s: &str| embedded_v4(s.parse().unwrap());
        let lo: Ipv4Addr = "127.0.0.1".parse().unwrap();
        assert_eq!(v4("::ffff:127.0.0.1"), Some((Embedding::Mapped, vec![lo])));
        assert_eq!(v4("::ffff:0:127.0.0.1"), Some((Embedding::Siit, vec![lo])));
        assert_eq!(v4("::127.0.0.1"), Some((Embedding::Compatible, vec![lo])));
        assert_eq!(v4("64:ff9b::7f00:1"), Some((Embedding::Nat64, vec![lo])));
        assert_eq!(v4("64:ff9b:1::7f00:1"), Some((Embedding::LocalNat64, vec![lo])));
        assert_eq!(v4("2002:7f00:1::1"), Some((Embedding::SixToFour, vec![lo])));
        let server: Ipv4Addr = "65.54.227.120".parse().unwrap();
        assert_eq!(v4("2001:0:4136:e378:8000:63bf:80ff:fffe"), Some((Embedding::Teredo, vec![server, lo])));
        assert_eq!(v4("::1"), None);
        assert_eq!(v4("2606:4700::1111"), None);
    }

    #[test]
    fn public_addresses_in_every_form_are_global() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "192.0.1.1",
            "192.88.98.1",
            "198.20.0.1",
            "223.255.255.254",
            "2606:4700:4700::1111",
            "2a00:1450:4001:82b::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2001:0:4136:e378:8000:63bf:f7f7:f7f7",
        ] {
            assert!(global(ip), "{ip} is global");
        }
    }
}
