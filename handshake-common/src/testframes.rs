//! Builds Ethernet frames byte by byte for tests and benchmarks: the parser's
//! unit tests, the BPF_PROG_TEST_RUN tests and `cargo xtask bench` all state
//! their inputs with this one builder. Userspace only.

use alloc::vec::Vec;

use crate::packet::{ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6};

#[derive(Clone, Debug)]
enum L4 {
    Tcp { flags: u8, payload: Vec<u8> },
    Udp,
}

/// A frame under construction. Defaults: 10.0.0.1:40000 → 10.0.0.2:443
/// (or fd00::1 → fd00::2), no tags, no options.
#[derive(Clone, Debug)]
pub struct FrameBuilder {
    v6: bool,
    vlan_tags: usize,
    ip_options: usize,
    tcp_options: usize,
    ihl: Option<u8>,
    data_offset: Option<u8>,
    fragment_offset: u16,
    extensions: Vec<(u8, usize, u16)>,
    l4: L4,
}

impl FrameBuilder {
    fn new(v6: bool) -> Self {
        Self {
            v6,
            vlan_tags: 0,
            ip_options: 0,
            tcp_options: 0,
            ihl: None,
            data_offset: None,
            fragment_offset: 0,
            extensions: Vec::new(),
            l4: L4::Udp,
        }
    }

    pub fn v4() -> Self {
        Self::new(false)
    }

    pub fn v6() -> Self {
        Self::new(true)
    }

    /// Outer tags are 802.1ad, the innermost 802.1Q.
    pub fn vlan(mut self, tags: usize) -> Self {
        self.vlan_tags = tags;
        self
    }

    /// IPv4 options of `len` bytes (a multiple of 4), NOPs then an EOL.
    pub fn ip_options(mut self, len: usize) -> Self {
        self.ip_options = len;
        self
    }

    /// TCP options of `len` bytes (a multiple of 4): MSS, then NOPs.
    pub fn tcp_options(mut self, len: usize) -> Self {
        self.tcp_options = len;
        self
    }

    /// Writes this IHL whatever the real header length.
    pub fn ihl(mut self, ihl: u8) -> Self {
        self.ihl = Some(ihl);
        self
    }

    /// Writes this TCP data offset whatever the real header length.
    pub fn data_offset(mut self, words: u8) -> Self {
        self.data_offset = Some(words);
        self
    }

    /// IPv4 fragment offset in 8-byte units.
    pub fn fragment_offset(mut self, units: u16) -> Self {
        self.fragment_offset = units;
        self
    }

    /// An IPv6 extension header of protocol `proto` and `len` bytes.
    pub fn ipv6_ext(mut self, proto: u8, len: usize) -> Self {
        self.extensions.push((proto, len, 0));
        self
    }

    /// An IPv6 fragment header with this offset in 8-byte units.
    pub fn ipv6_fragment(mut self, units: u16) -> Self {
        self.extensions.push((44, 8, units));
        self
    }

    pub fn tcp(mut self, flags: u8, payload: &[u8]) -> Self {
        self.l4 = L4::Tcp {
            flags,
            payload: payload.to_vec(),
        };
        self
    }

    pub fn udp(mut self) -> Self {
        self.l4 = L4::Udp;
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let proto = match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp => 17,
        };
        let mut f = Vec::new();
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1]);
        for i in 0..self.vlan_tags {
            let tpid = if i + 1 == self.vlan_tags {
                ETH_P_8021Q
            } else {
                ETH_P_8021AD
            };
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&(100 + i as u16).to_be_bytes());
        }
        let ethertype = if self.v6 { ETH_P_IPV6 } else { ETH_P_IP };
        f.extend_from_slice(&ethertype.to_be_bytes());
        if self.v6 {
            let ext_len: usize = self.extensions.iter().map(|e| e.1).sum();
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&((ext_len + l4.len()) as u16).to_be_bytes());
            let first = self.extensions.first().map_or(proto, |e| e.0);
            f.extend_from_slice(&[first, 64]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
            for (i, &(_, len, frag)) in self.extensions.iter().enumerate() {
                let next = self.extensions.get(i + 1).map_or(proto, |e| e.0);
                let mut ext = alloc::vec![0u8; len];
                ext[0] = next;
                if self.extensions[i].0 == 44 {
                    ext[2..4].copy_from_slice(&(frag << 3).to_be_bytes());
                } else if self.extensions[i].0 == 51 {
                    ext[1] = (len / 4 - 2) as u8;
                } else {
                    ext[1] = (len / 8 - 1) as u8;
                }
                f.extend_from_slice(&ext);
            }
        } else {
            let header_len = 20 + self.ip_options;
            let ihl = self.ihl.unwrap_or((header_len / 4) as u8);
            f.push(0x40 | ihl);
            f.push(0);
            f.extend_from_slice(&((header_len + l4.len()) as u16).to_be_bytes());
            f.extend_from_slice(&[0x12, 0x34]);
            f.extend_from_slice(&self.fragment_offset.to_be_bytes());
            f.extend_from_slice(&[64, proto, 0, 0]);
            f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
            let mut options = alloc::vec![1u8; self.ip_options];
            if let Some(last) = options.last_mut() {
                *last = 0;
            }
            f.extend_from_slice(&options);
        }
        f.extend_from_slice(&l4);
        f
    }

    fn l4_bytes(&self) -> Vec<u8> {
        match &self.l4 {
            L4::Udp => {
                let mut u = Vec::new();
                u.extend_from_slice(&5353u16.to_be_bytes());
                u.extend_from_slice(&5353u16.to_be_bytes());
                u.extend_from_slice(&[0, 12, 0, 0, 1, 2, 3, 4]);
                u
            }
            L4::Tcp { flags, payload } => {
                let header_len = 20 + self.tcp_options;
                let words = self.data_offset.unwrap_or((header_len / 4) as u8);
                let mut t = Vec::new();
                t.extend_from_slice(&40000u16.to_be_bytes());
                t.extend_from_slice(&443u16.to_be_bytes());
                t.extend_from_slice(&1000u32.to_be_bytes());
                t.extend_from_slice(&2000u32.to_be_bytes());
                t.push(words << 4);
                t.push(*flags);
                t.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
                let mut options = alloc::vec![1u8; self.tcp_options];
                if self.tcp_options >= 4 {
                    options[..4].copy_from_slice(&[2, 4, 0x05, 0xb4]);
                }
                t.extend_from_slice(&options);
                t.extend_from_slice(payload);
                t
            }
        }
    }
}

/// An ARP request frame (60 bytes, padded).
pub fn arp_frame() -> Vec<u8> {
    let mut f = alloc::vec![0xffu8; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.resize(60, 0);
    f
}

/// A TLS record holding a minimal ClientHello (TLS 1.2 legacy version,
/// one cipher suite, no extensions).
pub fn client_hello_record() -> Vec<u8> {
    handshake_record(1, &{
        let mut body = Vec::new();
        body.extend_from_slice(&[0x03, 0x03]);
        body.extend_from_slice(&[0x5a; 32]);
        body.push(0);
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        body
    })
}

/// A TLS record holding a minimal ServerHello.
pub fn server_hello_record() -> Vec<u8> {
    handshake_record(2, &{
        let mut body = Vec::new();
        body.extend_from_slice(&[0x03, 0x03]);
        body.extend_from_slice(&[0xa5; 32]);
        body.push(0);
        body.extend_from_slice(&[0x13, 0x01, 0]);
        body
    })
}

fn handshake_record(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut r = alloc::vec![22, 3, 1];
    r.extend_from_slice(&((body.len() + 4) as u16).to_be_bytes());
    r.push(kind);
    r.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    r.extend_from_slice(body);
    r
}
