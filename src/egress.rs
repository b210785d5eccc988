//! Where unrouted traffic may go: `proxy.allow` (host patterns and CIDRs) and
//! `proxy.block` (address classes). Pure: the dialer resolves names and asks
//! this module about the addresses it got, then connects only to those.
//!
//! The check is on addresses, never on spellings: `127.1`, `2130706433`,
//! `0x7f.0.0.1` and `[::ffff:127.0.0.1]` are all loopback (smokescreen's #285
//! was a hostname check bypassed with an octal IP).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::routes::{self, HostPattern};

/// A class of addresses `proxy.block` can refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// This host: 127.0.0.0/8, ::1, 0.0.0.0/8 and `::` (which reach this host
    /// too when connected to), and — judged by the dialer, see
    /// [`Policy::check_this_host`] — the addresses of its own interfaces.
    Loopback,
    /// 169.254.0.0/16 and fe80::/10, where cloud metadata services answer
    /// (169.254.169.254), plus AWS's IPv6 metadata address fd00:ec2::254.
    LinkLocal,
    /// RFC 1918, RFC 6598 (carrier-grade NAT) and fc00::/7 (unique local).
    Private,
}

const LOOPBACK: [IpNet; 4] = [
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8)),
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(0, 0, 0, 0), 8)),
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128)),
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 128)),
];

const LINK_LOCAL: [IpNet; 3] = [
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16)),
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
    )),
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254),
        128,
    )),
];

const PRIVATE: [IpNet; 5] = [
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 0, 0), 8)),
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(172, 16, 0, 0), 12)),
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(192, 168, 0, 0), 16)),
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10)),
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0),
        7,
    )),
];

/// The NAT64 well-known prefix (RFC 6052): on an IPv6-only network,
/// 64:ff9b::a9fe:a9fe reaches 169.254.169.254 through the NAT64 gateway.
const NAT64: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96);

impl AddressClass {
    pub const ALL: [Self; 3] = [Self::Loopback, Self::LinkLocal, Self::Private];

    /// The default `proxy.block`.
    pub const DEFAULT_BLOCK: [Self; 2] = [Self::Loopback, Self::LinkLocal];

    /// The class of `ip`, or None for a public address. Classes are tried in
    /// order, so fd00:ec2::254 is link-local (metadata), not private.
    pub fn of(ip: IpAddr) -> Option<Self> {
        let ip = canonical(ip);
        [
            (Self::Loopback, &LOOPBACK[..]),
            (Self::LinkLocal, &LINK_LOCAL[..]),
            (Self::Private, &PRIVATE[..]),
        ]
        .into_iter()
        .find(|(_, nets)| nets.iter().any(|net| net.contains(&ip)))
        .map(|(class, _)| class)
    }

    fn nets(self) -> &'static [IpNet] {
        match self {
            Self::Loopback => &LOOPBACK,
            Self::LinkLocal => &LINK_LOCAL,
            Self::Private => &PRIVATE,
        }
    }

    /// For messages: "… is a link-local address".
    fn described(self) -> &'static str {
        match self {
            Self::Loopback => "an address of this host (loopback)",
            Self::LinkLocal => "a link-local address",
            Self::Private => "a private address",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::LinkLocal => "link-local",
            Self::Private => "private",
        }
    }
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An IPv6 address that carries an IPv4 one is judged as that IPv4 address:
/// IPv4-mapped (::ffff:a.b.c.d, which the kernel connects over IPv4), the
/// deprecated IPv4-compatible form (::a.b.c.d), and NAT64 (64:ff9b::a.b.c.d).
fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let octets = v6.octets();
    let embedded = || {
        let [.., a, b, c, d] = octets;
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    };
    let compatible = octets[..12].iter().all(|&b| b == 0) && u128::from(v6) > 1;
    if compatible || NAT64.contains(&v6) {
        return embedded();
    }
    ip
}

/// `host` as an IP address if it is one, in any spelling a resolver would
/// accept: IPv6 (bracketed or not) and every inet_aton(3) form of IPv4 —
/// `127.1`, `2130706433`, `0x7f.0.0.1`, `0177.0.0.1`.
pub fn ip_literal(host: &str) -> Option<IpAddr> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(ip);
    }
    inet_aton(host.trim_end_matches('.')).map(IpAddr::V4)
}

/// inet_aton(3): one to four parts, each decimal, octal (leading 0) or hex
/// (0x); the last part fills the remaining bytes.
fn inet_aton(text: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let values: Vec<u32> = parts
        .iter()
        .map(|part| number(part))
        .collect::<Option<_>>()?;
    let (last, leading) = values.split_last()?;
    if leading.iter().any(|&v| v > 0xff) {
        return None;
    }
    let last_bits = 32 - 8 * leading.len() as u32;
    if last_bits < 32 && *last >> last_bits != 0 {
        return None;
    }
    let high = leading
        .iter()
        .enumerate()
        .fold(0u32, |acc, (i, &v)| acc | v << (24 - 8 * i as u32));
    Some(Ipv4Addr::from(high | last))
}

fn number(part: &str) -> Option<u32> {
    let (digits, radix) = match part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None if part.len() > 1 && part.starts_with('0') => (&part[1..], 8),
        None => (part, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u32::from_str_radix(digits, radix).ok()
}

// === Policy ===

/// One `proxy.allow` entry.
#[derive(Clone, PartialEq, Eq)]
pub enum AllowEntry {
    Host(HostPattern),
    /// A CIDR, or a single address as a /32 or /128.
    Net(IpNet),
}

impl AllowEntry {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.contains('/') {
            let net = text
                .parse::<IpNet>()
                .map_err(|_| format!("{text:?} is not a CIDR like \"10.20.0.0/16\""))?;
            return Ok(Self::Net(net.trunc()));
        }
        if let Some(ip) = ip_literal(text) {
            return Ok(Self::Net(IpNet::from(canonical(ip))));
        }
        HostPattern::parse(text).map(Self::Host).map_err(|_| {
            format!(
                "{text:?} is not a host, a \"*.\" wildcard like \"*.github.com\", or a CIDR like \"10.20.0.0/16\""
            )
        })
    }
}

impl fmt::Debug for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host(pattern) => write!(f, "{pattern}"),
            Self::Net(net) => write!(f, "{net}"),
        }
    }
}

/// Why an unrouted destination was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{host} is not in proxy.allow")]
    NotAllowed { host: String },
    #[error("{host} is {}, which proxy.block refuses", class.described())]
    BlockedLiteral { host: String, class: AddressClass },
    #[error("{host} resolves to {}, which proxy.block refuses", class.described())]
    Blocked {
        host: String,
        class: AddressClass,
        /// For the log, not for the client: internal DNS answers stay inside.
        addr: IpAddr,
    },
}

/// `proxy.allow` and `proxy.block`, for unrouted destinations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Empty: any destination that is not blocked.
    allow: Vec<AllowEntry>,
    block: Vec<AddressClass>,
}

impl Default for Policy {
    fn default() -> Self {
        Self::new(Vec::new(), AddressClass::DEFAULT_BLOCK.to_vec())
    }
}

impl Policy {
    pub fn new(allow: Vec<AllowEntry>, block: Vec<AddressClass>) -> Self {
        Self { allow, block }
    }

    pub fn allow(&self) -> &[AllowEntry] {
        &self.allow
    }

    /// The blocked class that holds every address of `net`, if any: such an
    /// allow entry could never admit anything, since block wins.
    pub fn blocked_class_of(&self, net: &IpNet) -> Option<AddressClass> {
        self.block
            .iter()
            .copied()
            .find(|class| class.nets().iter().any(|blocked| blocked.contains(net)))
    }

    /// Before resolving a name: refuses one that no allow entry can admit, so
    /// a refused name costs no DNS query.
    pub fn may_resolve(&self, host: &str) -> Result<(), Refusal> {
        let any_net = self.allow.iter().any(|e| matches!(e, AllowEntry::Net(_)));
        if self.allow.is_empty() || any_net || self.name_allowed(host) {
            Ok(())
        } else {
            Err(Refusal::NotAllowed { host: host.into() })
        }
    }

    /// Checks every address `host` resolved to (or the address it spells):
    /// one blocked address refuses the destination, and unless the name is
    /// allowed, every address must be inside an allowed CIDR.
    pub fn check(&self, host: &str, addrs: &[IpAddr]) -> Result<(), Refusal> {
        self.check_block(host, addrs)?;
        self.check_allow(host, addrs)
    }

    /// `allow` only: for a host pinned by `upstream.resolve`, whose address
    /// is the operator's own choice, but whose name is still a destination.
    pub fn check_allow(&self, host: &str, addrs: &[IpAddr]) -> Result<(), Refusal> {
        let literal = ip_literal(host).is_some();
        if self.allow.is_empty() || (!literal && self.name_allowed(host)) {
            return Ok(());
        }
        let in_allowed_net = |addr: &IpAddr| {
            let addr = canonical(*addr);
            self.allow
                .iter()
                .any(|e| matches!(e, AllowEntry::Net(net) if net.contains(&addr)))
        };
        if !addrs.is_empty() && addrs.iter().all(in_allowed_net) {
            Ok(())
        } else {
            Err(Refusal::NotAllowed { host: host.into() })
        }
    }

    fn check_block(&self, host: &str, addrs: &[IpAddr]) -> Result<(), Refusal> {
        let literal = ip_literal(host).is_some();
        let blocked = addrs.iter().find_map(|&addr| {
            let class = AddressClass::of(addr).filter(|c| self.block.contains(c))?;
            Some((addr, class))
        });
        match blocked {
            None => Ok(()),
            Some((addr, class)) => Err(refusal(host, literal, class, addr)),
        }
    }

    /// With `loopback` blocked, also refuses the addresses of this host's own
    /// interfaces (`is_local` says which): connecting to its public address
    /// reaches a service bound to 0.0.0.0 as surely as 127.0.0.1 does.
    pub fn check_this_host(
        &self,
        host: &str,
        addrs: &[IpAddr],
        is_local: impl Fn(IpAddr) -> bool,
    ) -> Result<(), Refusal> {
        if !self.block.contains(&AddressClass::Loopback) {
            return Ok(());
        }
        match addrs
            .iter()
            .copied()
            .find(|&addr| is_local(canonical(addr)))
        {
            None => Ok(()),
            Some(addr) => {
                let literal = ip_literal(host).is_some();
                Err(refusal(host, literal, AddressClass::Loopback, addr))
            }
        }
    }

    fn name_allowed(&self, host: &str) -> bool {
        let host = routes::normalize(host);
        self.allow
            .iter()
            .any(|e| matches!(e, AllowEntry::Host(pattern) if pattern.matches(&host)))
    }
}

fn refusal(host: &str, literal: bool, class: AddressClass, addr: IpAddr) -> Refusal {
    let host = host.into();
    match literal {
        true => Refusal::BlockedLiteral { host, class },
        false => Refusal::Blocked { host, class, addr },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn policy(allow: &[&str], block: &[AddressClass]) -> Policy {
        let allow = allow
            .iter()
            .map(|a| AllowEntry::parse(a).unwrap())
            .collect();
        Policy::new(allow, block.to_vec())
    }

    mod ip_literal {
        use super::*;

        #[test]
        fn every_ipv4_spelling_is_the_same_address() {
            for spelling in [
                "127.0.0.1",
                "127.1",
                "127.0.1",
                "2130706433",
                "0x7f000001",
                "0x7f.0.0.1",
                "0X7F.1",
                "0177.0.0.1",
                "0177.1",
                "017700000001",
                "127.0.0.1.",
            ] {
                assert_eq!(ip_literal(spelling), Some(ip("127.0.0.1")), "{spelling}");
            }
            assert_eq!(ip_literal("169.254.43518"), Some(ip("169.254.169.254")));
            assert_eq!(ip_literal("0"), Some(ip("0.0.0.0")));
        }

        #[test]
        fn ipv6_with_or_without_brackets() {
            assert_eq!(ip_literal("[::1]"), Some(ip("::1")));
            assert_eq!(ip_literal("::ffff:127.0.0.1"), Some(ip("::ffff:127.0.0.1")));
        }

        #[test]
        fn names_and_out_of_range_numbers_are_not_addresses() {
            for name in [
                "example.com",
                "1.2.3.com",
                "0x",
                "08.0.0.1",
                "0xg.1",
                "256.0.0.1",
                "1.2.3.4.5",
                "4294967296",
                "1.16777216",
                "1.2.65536",
                "",
                "1..2",
            ] {
                assert_eq!(ip_literal(name), None, "{name}");
            }
        }
    }

    mod classes {
        use super::*;
        use AddressClass::*;

        #[test]
        fn each_address_has_its_class() {
            let cases = [
                ("127.0.0.1", Some(Loopback)),
                ("127.255.255.254", Some(Loopback)),
                ("0.0.0.0", Some(Loopback)),
                ("0.1.2.3", Some(Loopback)),
                ("::1", Some(Loopback)),
                ("::", Some(Loopback)),
                ("::ffff:127.0.0.1", Some(Loopback)),
                ("::ffff:0.0.0.0", Some(Loopback)),
                ("::127.0.0.1", Some(Loopback)),
                ("169.254.169.254", Some(LinkLocal)),
                ("::ffff:169.254.169.254", Some(LinkLocal)),
                ("64:ff9b::a9fe:a9fe", Some(LinkLocal)),
                ("fe80::1", Some(LinkLocal)),
                ("febf::1", Some(LinkLocal)),
                ("fd00:ec2::254", Some(LinkLocal)),
                ("10.1.2.3", Some(Private)),
                ("172.16.0.1", Some(Private)),
                ("172.31.255.255", Some(Private)),
                ("192.168.1.1", Some(Private)),
                ("100.64.0.1", Some(Private)),
                ("100.127.255.255", Some(Private)),
                ("fc00::1", Some(Private)),
                ("fd12:3456::1", Some(Private)),
                ("::ffff:10.0.0.1", Some(Private)),
                ("8.8.8.8", None),
                ("172.32.0.1", None),
                ("100.128.0.1", None),
                ("169.255.0.1", None),
                ("2606:4700::1111", None),
                ("fec0::1", None),
                ("::ffff:8.8.8.8", None),
            ];
            for (addr, class) in cases {
                assert_eq!(AddressClass::of(ip(addr)), class, "{addr}");
            }
        }
    }

    mod allow_entry {
        use super::*;

        #[test]
        fn hosts_wildcards_cidrs_and_addresses() {
            assert_eq!(
                AllowEntry::parse("PyPI.org").unwrap(),
                AllowEntry::Host(HostPattern::Exact("pypi.org".into()))
            );
            assert!(matches!(
                AllowEntry::parse("*.github.com").unwrap(),
                AllowEntry::Host(HostPattern::Wildcard(_))
            ));
            assert_eq!(
                AllowEntry::parse("10.20.3.4/16").unwrap(),
                AllowEntry::Net("10.20.0.0/16".parse().unwrap())
            );
            assert_eq!(
                AllowEntry::parse("192.0.2.7").unwrap(),
                AllowEntry::Net("192.0.2.7/32".parse().unwrap())
            );
            assert_eq!(
                AllowEntry::parse("2001:db8::/32").unwrap(),
                AllowEntry::Net("2001:db8::/32".parse().unwrap())
            );
            for bad in ["10.0.0.0/33", "not a host", "*.", "10.0.0.0/x", ""] {
                assert!(AllowEntry::parse(bad).is_err(), "{bad}");
            }
        }
    }

    mod check {
        use super::*;
        use AddressClass::*;

        #[test]
        fn the_default_blocks_loopback_and_link_local_in_any_spelling() {
            let policy = Policy::default();
            for host in [
                "127.1",
                "2130706433",
                "[::ffff:127.0.0.1]",
                "[::1]",
                "0.0.0.0",
            ] {
                let addr = ip_literal(host).unwrap();
                assert_eq!(
                    policy.check(host, &[addr]),
                    Err(Refusal::BlockedLiteral {
                        host: host.into(),
                        class: Loopback
                    }),
                    "{host}"
                );
            }
            let metadata = ip("169.254.169.254");
            assert!(matches!(
                policy.check("metadata.internal", &[metadata]),
                Err(Refusal::Blocked {
                    class: LinkLocal,
                    ..
                })
            ));
            assert_eq!(policy.check("10.0.0.1", &[ip("10.0.0.1")]), Ok(()));
            assert_eq!(policy.check("example.com", &[ip("93.184.215.14")]), Ok(()));
        }

        #[test]
        fn one_blocked_address_among_public_ones_refuses_the_name() {
            let policy = policy(&[], &AddressClass::ALL);
            let refused = policy.check("rebind.test", &[ip("93.184.215.14"), ip("10.0.0.5")]);
            assert_eq!(
                refused,
                Err(Refusal::Blocked {
                    host: "rebind.test".into(),
                    class: Private,
                    addr: ip("10.0.0.5")
                })
            );
            assert_eq!(
                refused.unwrap_err().to_string(),
                "rebind.test resolves to a private address, which proxy.block refuses",
                "the client is not told the internal address"
            );
        }

        #[test]
        fn block_wins_over_allow() {
            let policy = policy(&["localhost", "127.0.0.0/8"], &[Loopback]);
            assert!(policy.check("localhost", &[ip("127.0.0.1")]).is_err());
            assert!(policy.check("127.0.0.1", &[ip("127.0.0.1")]).is_err());
            assert_eq!(
                policy.blocked_class_of(&"127.0.0.0/16".parse().unwrap()),
                Some(Loopback)
            );
            assert_eq!(policy.blocked_class_of(&"0.0.0.0/0".parse().unwrap()), None);
        }

        #[test]
        fn this_hosts_own_addresses_count_as_loopback() {
            let own = ip("192.0.2.2");
            let is_local = |addr: IpAddr| addr == own;
            let policy = Policy::default();
            assert_eq!(
                policy.check_this_host("192.0.2.2", &[own], is_local),
                Err(Refusal::BlockedLiteral {
                    host: "192.0.2.2".into(),
                    class: Loopback
                })
            );
            let mapped = ip("::ffff:192.0.2.2");
            assert!(
                policy
                    .check_this_host("me.test", &[mapped], is_local)
                    .is_err()
            );
            assert_eq!(
                policy.check_this_host("x", &[ip("192.0.2.3")], is_local),
                Ok(())
            );
            let without_loopback = Policy::new(Vec::new(), vec![LinkLocal]);
            assert_eq!(
                without_loopback.check_this_host("x", &[own], is_local),
                Ok(())
            );
        }

        #[test]
        fn an_empty_block_lets_everything_through() {
            let policy = policy(&[], &[]);
            assert_eq!(policy.check("127.1", &[ip("127.0.0.1")]), Ok(()));
            assert_eq!(policy.check("x", &[ip("169.254.169.254")]), Ok(()));
        }

        #[test]
        fn allow_admits_names_by_pattern_and_addresses_by_cidr() {
            let policy = policy(&["*.github.com", "pypi.org", "10.20.0.0/16"], &[]);
            let public = ip("140.82.112.3");
            assert_eq!(policy.check("api.github.com", &[public]), Ok(()));
            assert_eq!(policy.check("PyPI.org.", &[public]), Ok(()));
            assert_eq!(policy.check("db.corp", &[ip("10.20.1.1")]), Ok(()));
            assert_eq!(policy.check("10.20.1.1", &[ip("10.20.1.1")]), Ok(()));
            assert_eq!(
                policy.check("[::ffff:10.20.1.1]", &[ip("::ffff:10.20.1.1")]),
                Ok(())
            );
            for (host, addrs) in [
                ("github.com", vec![public]),
                ("example.com", vec![public]),
                ("mixed.corp", vec![ip("10.20.1.1"), ip("10.21.0.1")]),
                ("10.21.0.1", vec![ip("10.21.0.1")]),
                ("nothing.test", vec![]),
            ] {
                assert_eq!(
                    policy.check(host, &addrs),
                    Err(Refusal::NotAllowed { host: host.into() }),
                    "{host}"
                );
            }
        }

        #[test]
        fn a_name_allow_list_refuses_other_names_before_resolving() {
            let names = policy(&["pypi.org"], &[]);
            assert_eq!(names.may_resolve("pypi.org"), Ok(()));
            assert!(names.may_resolve("example.com").is_err());
            // With a CIDR in the list, any name may resolve into it.
            let with_net = policy(&["pypi.org", "10.0.0.0/8"], &[]);
            assert_eq!(with_net.may_resolve("example.com"), Ok(()));
            assert_eq!(policy(&[], &[]).may_resolve("example.com"), Ok(()));
        }
    }
}
