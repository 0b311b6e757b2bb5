//! The names the API and the metrics print, each made in one place from
//! the kernel's numbers: address families, this host's role, handshake
//! outcomes, TCP states.

use std::{
    borrow::Cow,
    net::{Ipv4Addr, Ipv6Addr},
};

use handshake_common::{
    abi::{AF_INET, tcp_state},
    flow::IP_VERSION_4,
};

/// An address family, whichever encoding it came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    /// From the packet hooks' records (`Flow`, `TlsKey`): 4 or 6.
    pub const fn from_ip_version(version: u8) -> Self {
        if version == IP_VERSION_4 {
            Self::Ipv4
        } else {
            Self::Ipv6
        }
    }

    /// From the census's records (`Socket`, `TwKey`): `AF_INET` or
    /// `AF_INET6`.
    pub const fn from_af(af: u16) -> Self {
        if af == AF_INET {
            Self::Ipv4
        } else {
            Self::Ipv6
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
        }
    }

    /// An address of this family as the kernel stores it (IPv4 in the
    /// first four bytes), in its usual text form.
    pub fn address(self, bytes: &[u8; 16]) -> String {
        match self {
            Self::Ipv4 => Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string(),
            Self::Ipv6 => Ipv6Addr::from(*bytes).to_string(),
        }
    }
}

/// This host's side of a connection.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum Role {
    /// It sent the SYN (or the ClientHello).
    Client,
    /// It answered.
    Server,
}

impl Role {
    pub const ALL: [Self; 2] = [Self::Client, Self::Server];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

/// What became of a handshake.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum Outcome {
    Established,
    Refused,
    /// A RST after the handshake, before any data.
    Reset,
    Timeout,
    /// Not decided yet.
    InProgress,
}

impl Outcome {
    /// The outcomes a handshake can end with.
    pub const DECIDED: [Self; 4] = [Self::Established, Self::Refused, Self::Reset, Self::Timeout];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Established => "established",
            Self::Refused => "refused",
            Self::Reset => "reset",
            Self::Timeout => "timeout",
            Self::InProgress => "in_progress",
        }
    }
}

/// Where a handshake's timings came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The packet hooks: wire-exact.
    Wire,
    /// The socket layer (the state tracepoint), every namespace.
    Socket,
    /// Both saw it; the timings are the wire's.
    Both,
}

impl Source {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Wire => "wire",
            Self::Socket => "socket",
            Self::Both => "both",
        }
    }
}

/// The eleven TCP states `ss` reports, in the kernel's order.
pub const STATES: [u32; 11] = [
    tcp_state::ESTABLISHED,
    tcp_state::SYN_SENT,
    tcp_state::SYN_RECV,
    tcp_state::FIN_WAIT1,
    tcp_state::FIN_WAIT2,
    tcp_state::TIME_WAIT,
    tcp_state::CLOSE,
    tcp_state::CLOSE_WAIT,
    tcp_state::LAST_ACK,
    tcp_state::LISTEN,
    tcp_state::CLOSING,
];

/// A kernel state number's name as node_exporter spells it (`close_wait`);
/// `state_N` for a number outside the kernel's set, so that two unknown
/// states never share a name (or a metric series).
pub fn state_name(state: u32) -> Cow<'static, str> {
    tcp_state::name(state).map_or_else(|| Cow::Owned(format!("state_{state}")), Cow::Borrowed)
}

/// A state by the name `ss` or this tool prints (`close_wait`,
/// `CLOSE-WAIT`, `estab`...).
pub fn state_by_name(name: &str) -> Option<u32> {
    let bare = |s: &str| s.to_ascii_lowercase().replace(['-', '_'], "");
    let name = match bare(name).as_str() {
        "estab" => "established".to_owned(),
        other => other.to_owned(),
    };
    STATES
        .iter()
        .copied()
        .find(|s| bare(&state_name(*s)) == name)
}

#[cfg(test)]
mod tests {
    use handshake_common::abi::AF_INET6;

    use super::*;

    #[test]
    fn states_are_found_by_any_usual_spelling() {
        assert_eq!(state_by_name("FIN-WAIT-2"), Some(tcp_state::FIN_WAIT2));
        assert_eq!(state_by_name("close_wait"), Some(tcp_state::CLOSE_WAIT));
        assert_eq!(state_by_name("ESTAB"), Some(tcp_state::ESTABLISHED));
        assert_eq!(state_by_name("SYN-SENT"), Some(tcp_state::SYN_SENT));
        assert_eq!(state_by_name("half-open"), None);
        assert_eq!(state_by_name("state_13"), None);
    }

    #[test]
    fn unknown_states_keep_their_number() {
        assert_eq!(state_name(tcp_state::TIME_WAIT), "time_wait");
        assert_eq!(state_name(0), "state_0");
        assert_eq!(state_name(13), "state_13");
    }

    #[test]
    fn both_family_encodings_give_one_name_and_one_address_form() {
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[10, 0, 0, 1]);
        for family in [Family::from_ip_version(4), Family::from_af(AF_INET)] {
            assert_eq!(
                (family.name(), family.address(&v4).as_str()),
                ("ipv4", "10.0.0.1")
            );
        }
        let v6 = Ipv6Addr::LOCALHOST.octets();
        for family in [Family::from_ip_version(6), Family::from_af(AF_INET6)] {
            assert_eq!(
                (family.name(), family.address(&v6).as_str()),
                ("ipv6", "::1")
            );
        }
    }
}
