//! Where webhooks may be delivered. A webhook URL is chosen by whoever holds a key that may
//! manage webhooks, and the server connects to it from inside the network: without a check,
//! `http://169.254.169.254/latest/meta-data` reads the cloud's instance credentials and
//! `http://10.0.0.5:9200` reaches internal services (server-side request forgery).
//!
//! So loopback, link-local, private, shared (CGNAT), unspecified, multicast, broadcast and
//! documentation addresses — and their IPv4-mapped IPv6 forms — are refused unless they fall
//! in a range of `[webhooks] allow_targets`. The check runs when the subscription is created
//! and again on every connection, on the addresses the name resolves to then (a name that
//! resolved to a public address at creation and to a private one later — DNS rebinding — is
//! refused at connect time), through [`CheckedResolver`]. Redirects are never followed: a
//! `3xx` answer is a failed delivery.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;

/// An address range, `10.0.0.0/8` or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Cidr, String> {
        let bad = || format!("`{text}` is not an address or range like 10.0.0.0/8 or ::1/128");
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Why an address is not a public one, if it is not.
pub fn restricted(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => restricted_v4(v4),
        IpAddr::V6(v6) => restricted_v6(v6),
    }
}

fn restricted_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    Some(if ip.is_loopback() {
        "loopback"
    } else if ip.is_link_local() {
        "link-local (cloud metadata lives here)"
    } else if ip.is_private() {
        "private"
    } else if a == 100 && (64..128).contains(&b) {
        "shared address space (CGNAT)"
    } else if ip.is_unspecified() || a == 0 {
        "unspecified"
    } else if ip.is_multicast() || a >= 240 {
        "multicast or reserved"
    } else if ip.is_broadcast() {
        "broadcast"
    } else if ip.is_documentation() || (a == 198 && (b == 18 || b == 19)) {
        "documentation or benchmarking"
    } else {
        return None;
    })
}

fn restricted_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    Some(if ip.is_loopback() {
        "loopback"
    } else if ip.is_unspecified() {
        "unspecified"
    } else if (first & 0xffc0) == 0xfe80 {
        "link-local"
    } else if (first & 0xfe00) == 0xfc00 {
        "private (unique local)"
    } else if ip.is_multicast() {
        "multicast"
    } else if first == 0x2001 && ip.segments()[1] == 0x0db8 {
        "documentation"
    } else if first == 0x0064 && ip.segments()[1] == 0xff9b {
        "NAT64 (may reach private IPv4)"
    } else {
        return None;
    })
}

/// The allow-list: what may be reached although it is not public.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetPolicy {
    pub allow: Vec<Cidr>,
}

impl TargetPolicy {
    pub fn parse(entries: &[String]) -> Result<TargetPolicy, String> {
        let allow = entries
            .iter()
            .map(|e| e.parse().map_err(|m| format!("[webhooks] allow_targets: {m}")))
            .collect::<Result<_, _>>()?;
        Ok(TargetPolicy { allow })
    }

    /// `Err` with the reason when `addr` may not be reached.
    pub fn check(&self, addr: IpAddr) -> Result<(), String> {
        match restricted(addr) {
            Some(why) if !self.allow.iter().any(|c| c.contains(addr)) => Err(format!(
                "{addr} is a {why} address; webhooks may reach it only if [webhooks] allow_targets lists it"
            )),
            _ => Ok(()),
        }
    }

    /// Resolves `host` and checks every address it has; `Err` if any is refused (a name that
    /// mixes public and private addresses is refused whole).
    pub async fn check_host(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| format!("`{host}` does not resolve: {e}"))?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(format!("`{host}` resolves to no address"));
        }
        for a in &addrs {
            self.check(a.ip()).map_err(|m| format!("`{host}`: {m}"))?;
        }
        Ok(addrs)
    }
}

/// The resolver of the webhook client: resolves, then drops every address the policy refuses
/// (failing when none is left), at every connection.
#[derive(Clone)]
pub struct CheckedResolver(pub Arc<TargetPolicy>);

type Resolving = Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, std::io::Error>> + Send>>;

impl tower_service::Service<Name> for CheckedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Resolving;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.0.clone();
        Box::pin(async move {
            let addrs = policy
                .check_host(name.as_str(), 0)
                .await
                .map_err(|m| std::io::Error::new(std::io::ErrorKind::PermissionDenied, m))?;
            Ok(addrs.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn non_public_addresses_are_named() {
        for (addr, why) in [
            ("169.254.169.254", "link-local"),
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "shared"),
            ("0.0.0.0", "unspecified"),
            ("::1", "loopback"),
            ("fe80::1", "link-local"),
            ("fd00::1", "private"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::ffff:127.0.0.1", "loopback"),
            ("224.0.0.1", "multicast"),
        ] {
            let reason = restricted(ip(addr)).unwrap_or_else(|| panic!("{addr} passed"));
            assert!(reason.contains(why), "{addr}: {reason}");
        }
        for public in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert_eq!(restricted(ip(public)), None, "{public}");
        }
    }

    #[test]
    fn the_allow_list_opens_ranges() {
        let policy =
            TargetPolicy::parse(&["127.0.0.1".into(), "10.0.0.0/8".into(), "fd00::/8".into()]).unwrap();
        assert!(policy.check(ip("127.0.0.1")).is_ok());
        assert!(policy.check(ip("::ffff:127.0.0.1")).is_ok());
        assert!(policy.check(ip("127.0.0.2")).is_err());
        assert!(policy.check(ip("10.200.0.1")).is_ok());
        assert!(policy.check(ip("fd12::1")).is_ok());
        let err = policy.check(ip("169.254.169.254")).unwrap_err();
        assert!(err.contains("allow_targets"), "{err}");
        assert!(TargetPolicy::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(TargetPolicy::parse(&["example.com".into()]).is_err());
    }

    #[tokio::test]
    async fn names_are_checked_on_what_they_resolve_to() {
        let policy = TargetPolicy::default();
        let err = policy.check_host("localhost", 80).await.unwrap_err();
        assert!(err.contains("loopback"), "{err}");
        let err = policy.check_host("[::1]", 80).await.unwrap_err();
        assert!(err.contains("loopback"), "{err}");
        let open = TargetPolicy::parse(&["127.0.0.0/8".into(), "::1".into()]).unwrap();
        assert!(open.check_host("localhost", 80).await.is_ok());
    }
}
