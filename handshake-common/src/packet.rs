//! The one packet parser: Ethernet (with up to two 802.1Q / 802.1ad tags),
//! IPv4 (with options) or IPv6 (walking hop-by-hop, routing, fragment,
//! destination-options and AH headers), then the TCP header. It reads
//! through [`Packet`], so the same code runs over a byte slice in userspace
//! tests, over an XDP frame and over an skb in the kernel.
//!
//! It never panics, every loop is bounded, and it reports frames it cannot
//! read as a [`ParseError`] so the caller can count them. Traffic that is
//! not TCP, and non-first fragments, are `Ok(None)`: not ours, not errors.

use crate::{abi::ParseError, tls};

/// Read access to a frame, starting at its Ethernet header.
pub trait Packet {
    /// Length of the whole frame in bytes.
    fn len(&self) -> usize;

    /// `N` bytes at `offset`, or `None` when they run past the end.
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Packet for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let end = offset.checked_add(N)?;
        self.get(offset..end)?.try_into().ok()
    }
}

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
/// Tags we look through; a third is counted as [`ParseError::VlanTooDeep`].
pub const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers we walk before giving up on a packet.
pub const MAX_IPV6_EXTENSIONS: usize = 6;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Ipv4,
    Ipv6,
}

/// What the parser learnt of a TCP segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSegment {
    pub family: Family,
    /// Source and destination addresses; IPv4 in the first 4 bytes.
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub flags: u8,
    /// Offset of the TCP header in the frame.
    pub tcp_offset: usize,
    /// Offset of the first payload byte in the frame.
    pub payload_offset: usize,
    /// Payload bytes, bounded by the IP length (not by Ethernet padding).
    pub payload_len: usize,
}

impl TcpSegment {
    pub const fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    pub const fn is_syn(&self) -> bool {
        self.has(tcp_flags::SYN) && !self.has(tcp_flags::ACK)
    }

    pub const fn is_syn_ack(&self) -> bool {
        self.has(tcp_flags::SYN) && self.has(tcp_flags::ACK)
    }

    /// Whether the payload opens with a TLS ClientHello or ServerHello.
    pub fn tls_hello<P: Packet + ?Sized>(&self, packet: &P) -> Option<tls::HelloKind> {
        if self.payload_len < tls::HELLO_PREFIX_LEN {
            return None;
        }
        let prefix = packet.load::<{ tls::HELLO_PREFIX_LEN }>(self.payload_offset)?;
        tls::hello_kind(&prefix)
    }
}

fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Parses the frame down to its TCP header.
///
/// `Ok(None)`: not TCP (ARP, UDP, ICMP, ...) or a non-first fragment.
#[inline(always)]
pub fn parse_tcp<P: Packet + ?Sized>(packet: &P) -> Result<Option<TcpSegment>, ParseError> {
    let frame_len = packet.len();
    let eth = packet
        .load::<ETH_HLEN>(0)
        .ok_or(ParseError::EthernetTruncated)?;
    let mut ethertype = be16([eth[12], eth[13]]);
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        // A tag is TCI (2 bytes) then the inner ethertype (2 bytes).
        let tag = packet.load::<4>(offset).ok_or(ParseError::VlanTruncated)?;
        ethertype = be16([tag[2], tag[3]]);
        offset += 4;
    }
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        return Err(ParseError::VlanTooDeep);
    }

    let (family, ip) = match ethertype {
        ETH_P_IP => match ipv4(packet, offset, frame_len)? {
            Some(ip) => (Family::Ipv4, ip),
            None => return Ok(None),
        },
        ETH_P_IPV6 => match ipv6(packet, offset, frame_len)? {
            Some(ip) => (Family::Ipv6, ip),
            None => return Ok(None),
        },
        _ => return Ok(None),
    };
    let Ip {
        tcp_offset,
        end: ip_end,
        src_addr,
        dst_addr,
    } = ip;

    let tcp = packet
        .load::<20>(tcp_offset)
        .ok_or(ParseError::TcpTruncated)?;
    if tcp_offset + 20 > ip_end {
        return Err(ParseError::TcpTruncated);
    }
    let data_offset = usize::from(tcp[12] >> 4) * 4;
    if data_offset < 20 {
        return Err(ParseError::TcpBadDataOffset);
    }
    let payload_offset = tcp_offset + data_offset;
    if payload_offset > ip_end {
        return Err(ParseError::TcpDataOffsetPastEnd);
    }
    Ok(Some(TcpSegment {
        family,
        src_addr,
        dst_addr,
        src_port: be16([tcp[0], tcp[1]]),
        dst_port: be16([tcp[2], tcp[3]]),
        flags: tcp[13],
        tcp_offset,
        payload_offset,
        payload_len: ip_end - payload_offset,
    }))
}

/// What the IP layer tells the TCP parser.
struct Ip {
    tcp_offset: usize,
    /// End of the IP packet (Ethernet padding excluded).
    end: usize,
    src_addr: [u8; 16],
    dst_addr: [u8; 16],
}

/// `None` when the packet is not TCP or is a non-first fragment.
#[inline(always)]
fn ipv4<P: Packet + ?Sized>(
    packet: &P,
    offset: usize,
    frame_len: usize,
) -> Result<Option<Ip>, ParseError> {
    let ip = packet.load::<20>(offset).ok_or(ParseError::Ipv4Truncated)?;
    if ip[0] >> 4 != 4 {
        return Err(ParseError::Ipv4BadHeader);
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    if header_len < 20 {
        return Err(ParseError::Ipv4BadHeader);
    }
    if offset + header_len > frame_len {
        return Err(ParseError::Ipv4Truncated);
    }
    let total_len = usize::from(be16([ip[2], ip[3]]));
    // A GSO super-packet on egress may carry 0 here (BIG TCP): trust the frame.
    let ip_end = if total_len == 0 {
        frame_len
    } else if total_len < header_len {
        return Err(ParseError::Ipv4BadHeader);
    } else {
        core::cmp::min(offset + total_len, frame_len)
    };
    let fragment_offset = be16([ip[6], ip[7]]) & 0x1fff;
    if fragment_offset != 0 || ip[9] != IPPROTO_TCP {
        return Ok(None);
    }
    Ok(Some(Ip {
        tcp_offset: offset + header_len,
        end: ip_end,
        src_addr: v4_field([ip[12], ip[13], ip[14], ip[15]]),
        dst_addr: v4_field([ip[16], ip[17], ip[18], ip[19]]),
    }))
}

/// An IPv4 address in the first 4 bytes of a 16-byte address field, the
/// rest zero. Built as one integer: a zeroed array filled in place
/// compiles, for BPF, to a call to a byte-at-a-time `memset` subprogram,
/// on every IPv4 packet.
#[inline(always)]
fn v4_field(addr: [u8; 4]) -> [u8; 16] {
    u128::from(u32::from_le_bytes(addr)).to_le_bytes()
}

#[inline(always)]
fn ipv6<P: Packet + ?Sized>(
    packet: &P,
    offset: usize,
    frame_len: usize,
) -> Result<Option<Ip>, ParseError> {
    let ip = packet.load::<40>(offset).ok_or(ParseError::Ipv6Truncated)?;
    let payload_len = usize::from(be16([ip[4], ip[5]]));
    // Jumbograms and BIG TCP carry 0 here: trust the frame.
    let ip_end = if payload_len == 0 {
        frame_len
    } else {
        core::cmp::min(offset + 40 + payload_len, frame_len)
    };
    let mut src_addr = [0u8; 16];
    let mut dst_addr = [0u8; 16];
    src_addr.copy_from_slice(&ip[8..24]);
    dst_addr.copy_from_slice(&ip[24..40]);
    let found = |tcp_offset| {
        Ok(Some(Ip {
            tcp_offset,
            end: ip_end,
            src_addr,
            dst_addr,
        }))
    };
    let mut next = ip[6];
    let mut cursor = offset + 40;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        let ext_len = match next {
            IPPROTO_TCP => return found(cursor),
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext = packet
                    .load::<2>(cursor)
                    .ok_or(ParseError::Ipv6ExtensionTruncated)?;
                next = ext[0];
                (usize::from(ext[1]) + 1) * 8
            }
            IPPROTO_AH => {
                let ext = packet
                    .load::<2>(cursor)
                    .ok_or(ParseError::Ipv6ExtensionTruncated)?;
                next = ext[0];
                (usize::from(ext[1]) + 2) * 4
            }
            IPPROTO_FRAGMENT => {
                let ext = packet
                    .load::<4>(cursor)
                    .ok_or(ParseError::Ipv6ExtensionTruncated)?;
                if be16([ext[2], ext[3]]) >> 3 != 0 {
                    return Ok(None);
                }
                next = ext[0];
                8
            }
            _ => return Ok(None),
        };
        cursor += ext_len;
        if cursor > frame_len {
            return Err(ParseError::Ipv6ExtensionTruncated);
        }
    }
    if next == IPPROTO_TCP {
        return found(cursor);
    }
    Err(ParseError::Ipv6TooManyExtensions)
}

#[cfg(test)]
mod tests {
    //! Frames are built byte by byte here, apart from the parser, so a test
    //! states what is on the wire and what the parser must make of it.
    use super::*;
    use crate::testframes::*;
    use std::vec::Vec;

    fn parse(frame: &[u8]) -> Result<Option<TcpSegment>, ParseError> {
        parse_tcp(frame)
    }

    #[test]
    fn ipv4_syn() {
        let f = FrameBuilder::v4().tcp(tcp_flags::SYN, &[]).build();
        let s = parse(&f).unwrap().unwrap();
        assert_eq!(s.family, Family::Ipv4);
        assert!(s.is_syn() && !s.is_syn_ack());
        assert_eq!((s.src_port, s.dst_port), (40000, 443));
        assert_eq!(&s.src_addr[..4], &[10, 0, 0, 1]);
        assert_eq!(
            &s.dst_addr[..],
            &[10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(s.tcp_offset, 34);
        assert_eq!(s.payload_len, 0);
    }

    #[test]
    fn ipv6_syn_ack() {
        let f = FrameBuilder::v6()
            .tcp(tcp_flags::SYN | tcp_flags::ACK, &[])
            .build();
        let s = parse(&f).unwrap().unwrap();
        assert_eq!(s.family, Family::Ipv6);
        assert!(s.is_syn_ack());
        assert_eq!(s.tcp_offset, 54);
        assert_eq!(s.dst_addr[15], 2);
        assert_eq!(s.src_addr[0], 0xfd);
    }

    #[test]
    fn ethernet_padding_is_not_payload() {
        let mut f = FrameBuilder::v4().tcp(tcp_flags::ACK, &[]).build();
        f.resize(60, 0x16);
        assert_eq!(parse(&f).unwrap().unwrap().payload_len, 0);
    }

    #[test]
    fn client_hello_behind_tcp_options_and_ip_options() {
        let hello = client_hello_record();
        let f = FrameBuilder::v4()
            .ip_options(8)
            .tcp_options(12)
            .tcp(tcp_flags::ACK | tcp_flags::PSH, &hello)
            .build();
        let s = parse(&f).unwrap().unwrap();
        assert_eq!(s.tcp_offset, 14 + 28);
        assert_eq!(s.payload_offset, 14 + 28 + 32);
        assert_eq!(s.payload_len, hello.len());
        assert_eq!(s.tls_hello(&f[..]), Some(tls::HelloKind::Client));
    }

    #[test]
    fn vlan_single_double_and_too_deep() {
        for tags in [1, 2] {
            let f = FrameBuilder::v4()
                .vlan(tags)
                .tcp(tcp_flags::SYN, &[])
                .build();
            let s = parse(&f).unwrap().unwrap();
            assert_eq!(s.tcp_offset, 34 + 4 * tags, "{tags} tags");
        }
        let f = FrameBuilder::v6().vlan(3).tcp(tcp_flags::SYN, &[]).build();
        assert_eq!(parse(&f), Err(ParseError::VlanTooDeep));
    }

    #[test]
    fn ipv6_extension_headers_are_walked() {
        let f = FrameBuilder::v6()
            .ipv6_ext(IPPROTO_HOPOPTS, 8)
            .ipv6_ext(IPPROTO_ROUTING, 24)
            .ipv6_ext(IPPROTO_FRAGMENT, 8)
            .ipv6_ext(IPPROTO_DSTOPTS, 16)
            .tcp(tcp_flags::FIN | tcp_flags::ACK, &[])
            .build();
        let s = parse(&f).unwrap().unwrap();
        assert_eq!(s.tcp_offset, 54 + 8 + 24 + 8 + 16);
        assert!(s.has(tcp_flags::FIN));
    }

    #[test]
    fn ipv6_too_many_extensions() {
        let mut b = FrameBuilder::v6();
        for _ in 0..=MAX_IPV6_EXTENSIONS {
            b = b.ipv6_ext(IPPROTO_DSTOPTS, 8);
        }
        let f = b.tcp(tcp_flags::SYN, &[]).build();
        assert_eq!(parse(&f), Err(ParseError::Ipv6TooManyExtensions));
    }

    #[test]
    fn non_first_fragments_are_not_ours() {
        let f = FrameBuilder::v4()
            .fragment_offset(185)
            .tcp(tcp_flags::SYN, &[])
            .build();
        assert_eq!(parse(&f), Ok(None));
        let f = FrameBuilder::v6()
            .ipv6_fragment(185)
            .tcp(tcp_flags::SYN, &[])
            .build();
        assert_eq!(parse(&f), Ok(None));
        // The first fragment is parsed.
        let f = FrameBuilder::v6()
            .ipv6_fragment(0)
            .tcp(tcp_flags::SYN, &[])
            .build();
        assert!(parse(&f).unwrap().unwrap().is_syn());
    }

    #[test]
    fn other_protocols_are_not_ours() {
        assert_eq!(parse(&arp_frame()), Ok(None));
        assert_eq!(parse(&FrameBuilder::v4().udp().build()), Ok(None));
        assert_eq!(parse(&FrameBuilder::v6().udp().build()), Ok(None));
    }

    #[test]
    fn truncations_and_bad_headers_are_errors() {
        let syn = FrameBuilder::v4().tcp(tcp_flags::SYN, &[]).build();
        assert_eq!(parse(&syn[..13]), Err(ParseError::EthernetTruncated));
        assert_eq!(parse(&syn[..30]), Err(ParseError::Ipv4Truncated));
        assert_eq!(parse(&syn[..40]), Err(ParseError::TcpTruncated));
        let v6 = FrameBuilder::v6().tcp(tcp_flags::SYN, &[]).build();
        assert_eq!(parse(&v6[..50]), Err(ParseError::Ipv6Truncated));
        let tagged = FrameBuilder::v4().vlan(1).tcp(tcp_flags::SYN, &[]).build();
        assert_eq!(parse(&tagged[..16]), Err(ParseError::VlanTruncated));

        let bad_ihl = FrameBuilder::v4().ihl(4).tcp(tcp_flags::SYN, &[]).build();
        assert_eq!(parse(&bad_ihl), Err(ParseError::Ipv4BadHeader));
        let bad_doff = FrameBuilder::v4()
            .data_offset(4)
            .tcp(tcp_flags::SYN, &[])
            .build();
        assert_eq!(parse(&bad_doff), Err(ParseError::TcpBadDataOffset));
        let past_end = FrameBuilder::v4()
            .data_offset(15)
            .tcp(tcp_flags::SYN, &[])
            .build();
        assert_eq!(parse(&past_end), Err(ParseError::TcpDataOffsetPastEnd));
    }

    #[test]
    fn every_prefix_of_every_frame_is_safe() {
        let frames: Vec<Vec<u8>> = std::vec![
            FrameBuilder::v4()
                .vlan(2)
                .ip_options(40)
                .tcp_options(40)
                .tcp(tcp_flags::ACK, &client_hello_record())
                .build(),
            FrameBuilder::v6()
                .ipv6_ext(IPPROTO_HOPOPTS, 8)
                .ipv6_ext(IPPROTO_AH, 16)
                .tcp(tcp_flags::SYN, &[])
                .build(),
        ];
        for f in &frames {
            for end in 0..=f.len() {
                // Must return, whatever it returns.
                let _ = parse(&f[..end]);
            }
        }
    }
}
