//! Reading public capture files (pcap and pcapng, Ethernet, BSD loopback or
//! raw IP) as Ethernet frames, and the TLS hellos of their TCP streams.

use std::{collections::BTreeMap, fs::File, path::Path, time::Duration};

use handshake_common::{packet::parse_tcp, tls::handshake_bytes};
use pcap_file::{
    DataLink,
    pcap::PcapReader,
    pcapng::{Block, PcapNgReader},
};

/// One frame, with an Ethernet header whatever the file's link type.
#[derive(Clone, Debug)]
pub struct Frame {
    pub timestamp: Duration,
    pub bytes: Vec<u8>,
}

/// A made-up Ethernet header in front of an IP packet.
fn ethernet(ip: &[u8]) -> Option<Vec<u8>> {
    let ethertype: [u8; 2] = match ip.first()? >> 4 {
        4 => [0x08, 0x00],
        6 => [0x86, 0xdd],
        _ => return None,
    };
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    frame.extend_from_slice(&ethertype);
    frame.extend_from_slice(ip);
    Some(frame)
}

fn to_ethernet(link: DataLink, data: &[u8]) -> Option<Vec<u8>> {
    match link {
        DataLink::ETHERNET => Some(data.to_vec()),
        // BSD loopback: a 4-byte address family, then IP.
        DataLink::NULL | DataLink::LOOP => ethernet(data.get(4..)?),
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => ethernet(data),
        _ => None,
    }
}

/// Every frame of a pcap or pcapng file, as Ethernet.
pub fn read_frames(path: &Path) -> Vec<Frame> {
    let open = || File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut frames = Vec::new();
    if let Ok(mut reader) = PcapReader::new(open()) {
        let link = reader.header().datalink;
        while let Some(packet) = reader.next_packet() {
            let packet = packet.expect("pcap packet");
            if let Some(bytes) = to_ethernet(link, &packet.data) {
                frames.push(Frame {
                    timestamp: packet.timestamp,
                    bytes,
                });
            }
        }
        return frames;
    }
    let mut reader = PcapNgReader::new(open()).expect("a pcap or pcapng file");
    let mut links = Vec::new();
    while let Some(block) = reader.next_block() {
        match block.expect("pcapng block") {
            Block::InterfaceDescription(idb) => links.push(idb.linktype),
            Block::EnhancedPacket(epb) => {
                let link = links[epb.interface_id as usize];
                if let Some(bytes) = to_ethernet(link, &epb.data) {
                    frames.push(Frame {
                        timestamp: epb.timestamp,
                        bytes,
                    });
                }
            }
            _ => {}
        }
    }
    frames
}

/// A TCP stream direction: (source address, source port, destination
/// address, destination port), addresses as text.
pub type StreamKey = (String, u16, String, u16);

fn addr_text(family_v4: bool, bytes: &[u8; 16]) -> String {
    if family_v4 {
        std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string()
    } else {
        std::net::Ipv6Addr::from(*bytes).to_string()
    }
}

/// The first handshake message each stream direction sends, reassembled
/// from its TCP segments in sequence order: the ClientHello of clients and
/// the ServerHello of servers.
pub fn first_handshake_messages(frames: &[Frame]) -> BTreeMap<StreamKey, Vec<u8>> {
    let mut streams: BTreeMap<StreamKey, BTreeMap<u32, Vec<u8>>> = BTreeMap::new();
    for frame in frames {
        let Ok(Some(seg)) = parse_tcp(frame.bytes.as_slice()) else {
            continue;
        };
        if seg.payload_len == 0 {
            continue;
        }
        let v4 = seg.family == handshake_common::packet::Family::Ipv4;
        let key = (
            addr_text(v4, &seg.src_addr),
            seg.src_port,
            addr_text(v4, &seg.dst_addr),
            seg.dst_port,
        );
        let t = seg.tcp_offset;
        let seq = u32::from_be_bytes([
            frame.bytes[t + 4],
            frame.bytes[t + 5],
            frame.bytes[t + 6],
            frame.bytes[t + 7],
        ]);
        let payload =
            frame.bytes[seg.payload_offset..seg.payload_offset + seg.payload_len].to_vec();
        streams
            .entry(key)
            .or_default()
            .entry(seq)
            .or_insert(payload);
    }
    let mut out = BTreeMap::new();
    for (key, segments) in streams {
        // Contiguous bytes from the first segment on.
        let mut bytes = Vec::new();
        let mut next = None;
        for (seq, payload) in segments {
            if next.is_some_and(|n| n != seq) {
                break;
            }
            bytes.extend_from_slice(&payload);
            next = Some(seq.wrapping_add(payload.len() as u32));
        }
        let mut message = vec![0u8; 16 * 1024];
        let (len, complete) = handshake_bytes(&bytes, &mut message);
        if complete {
            message.truncate(len);
            out.insert(key, message);
        }
    }
    out
}

/// Writes `frames` as an Ethernet pcap, for tcpreplay.
pub fn write_ethernet_pcap(path: &Path, frames: &[Frame]) {
    let file = File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let header = pcap_file::pcap::PcapHeader {
        snaplen: 262_144,
        ..Default::default()
    };
    let mut writer = pcap_file::pcap::PcapWriter::with_header(file, header).expect("pcap header");
    for frame in frames {
        writer
            .write_packet(&pcap_file::pcap::PcapPacket::new(
                frame.timestamp,
                frame.bytes.len() as u32,
                &frame.bytes,
            ))
            .expect("write frame");
    }
}

/// The JA4 reference captures (`tests/data/ja4/`, a copy of the team's
/// `shared/testdata/ja4/`, so that any clone can run the tests), each with
/// its JSON of published values, in name order.
pub fn reference_captures() -> Vec<(std::path::PathBuf, serde_json::Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/ja4");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".pcap") || name.ends_with(".pcapng") {
            let json = std::fs::read_to_string(dir.join(format!("{name}.json")))
                .unwrap_or_else(|e| panic!("{name}.json: {e}"));
            out.push((path, serde_json::from_str(&json).expect("JSON")));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
