//! IP networks in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`, a bare address), for allow and
//! deny lists.
//!
//! An IPv4 address seen as IPv6 (`::ffff:192.0.2.1`, as a dual-stack socket reports an IPv4
//! peer) is the IPv4 address: both networks and addresses are put in canonical form, so a
//! `192.0.2.0/24` entry matches such a peer and a `::ffff:192.0.2.0/120` entry means
//! `192.0.2.0/24`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IP network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    net: IpAddr,
    len: u8,
}

/// Why a network was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid network {text:?}: {why}")]
pub struct CidrError {
    text: String,
    why: String,
}

impl Cidr {
    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix(u128::from(net.to_bits()) << 96, self.len) == prefix(u128::from(ip.to_bits()) << 96, self.len)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix(net.to_bits(), self.len) == prefix(ip.to_bits(), self.len),
            _ => false,
        }
    }

    /// Whether any of `nets` contains `ip`.
    pub fn any_contains(nets: &[Cidr], ip: IpAddr) -> bool {
        nets.iter().any(|n| n.contains(ip))
    }
}

/// The first `len` bits of `bits` (IPv4 addresses sit in the top 32 bits).
fn prefix(bits: u128, len: u8) -> u128 {
    match len {
        0 => 0,
        128.. => bits,
        n => bits & (u128::MAX << (128 - u32::from(n))),
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        let err = |why: String| CidrError { text: s.chars().take(64).collect(), why };
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = addr.trim().parse().map_err(|_| err("not an IP address".into()))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => match l.trim().parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(err(format!("the prefix length must be 0 to {max}"))),
            },
        };
        let (net, len) = match ip {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() && len >= 96 => (ip.to_canonical(), len - 96),
            _ => (ip, len),
        };
        let cidr = Cidr { net, len };
        let masked = cidr.masked();
        if masked != net {
            return Err(err(format!("host bits are set (the network is {masked}/{len})")));
        }
        Ok(cidr)
    }
}

impl Cidr {
    fn masked(&self) -> IpAddr {
        match self.net {
            IpAddr::V4(v4) => {
                let bits = prefix(u128::from(v4.to_bits()) << 96, self.len) >> 96;
                IpAddr::V4(std::net::Ipv4Addr::from_bits(bits as u32))
            }
            IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from_bits(prefix(v6.to_bits(), self.len))),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Cidr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn v4_and_v6_networks_contain_their_addresses_only() {
        assert!(net("10.0.0.0/8").contains(ip("10.255.1.2")));
        assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(net("192.0.2.7").contains(ip("192.0.2.7")));
        assert!(!net("192.0.2.7").contains(ip("192.0.2.8")));
        assert!(net("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!net("0.0.0.0/0").contains(ip("2001:db8::1")), "an IPv4 network holds no IPv6 address");
        assert!(net("2001:db8::/32").contains(ip("2001:db8:ffff::1")));
        assert!(!net("2001:db8::/32").contains(ip("2001:db9::1")));
        assert!(net("::/0").contains(ip("::1")));
        assert!(!net("::/0").contains(ip("127.0.0.1")));
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4() {
        assert!(net("192.0.2.0/24").contains(ip("::ffff:192.0.2.9")));
        let mapped = net("::ffff:192.0.2.0/120");
        assert_eq!(mapped, net("192.0.2.0/24"));
        assert!(mapped.contains(ip("192.0.2.1")));
        assert!(!net("::ffff:0:0/96").contains(ip("2001:db8::1")));
        assert!(net("::ffff:0:0/96").contains(ip("8.8.8.8")));
    }

    #[test]
    fn bad_networks_are_refused_with_a_reason() {
        for bad in ["", "10.0.0.0/33", "2001:db8::/129", "10.0.0.0/x", "example.com/8", "10.0.0.0/-1"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        let e = "10.1.2.3/8".parse::<Cidr>().expect_err("host bits");
        assert!(e.to_string().contains("10.0.0.0/8"), "{e}");
        assert_eq!(net(" 10.0.0.0 / 8 ".trim()).to_string(), "10.0.0.0/8");
    }
}
