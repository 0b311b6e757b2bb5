//! The real kernel programs, run on crafted frames with BPF_PROG_TEST_RUN:
//! every frame must pass, and the counters must move exactly as the frame
//! says — the ingress hooks count it as ingress, the egress hook as egress,
//! and a malformed frame moves exactly one parse-error counter.

use aya::programs::{ProgramError, SchedClassifier, TestRun as _, TestRunOptions, Xdp};
use handshake_common::{
    abi::{Direction, PacketKind, ParseError, map, program},
    packet::tcp_flags::{ACK, FIN, PSH, RST, SYN},
    testframes::{FrameBuilder, arp_frame, client_hello_record, server_hello_record},
};
use handshake_tests::{require_root, serial};
use handshake_user::kernel::{EBPF_OBJECT, loader::Observer, maps::KernelCounts};

const XDP_PASS: u32 = 2;
/// `TC_ACT_UNSPEC` (TCX_NEXT): the tc hooks let the next program decide.
const TC_ACT_UNSPEC: u32 = -1i32 as u32;

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    kinds: &'static [PacketKind],
    error: Option<ParseError>,
}

fn case(
    name: &'static str,
    frame: Vec<u8>,
    kinds: &'static [PacketKind],
    error: Option<ParseError>,
) -> Case {
    Case {
        name,
        frame,
        kinds,
        error,
    }
}

fn cases() -> Vec<Case> {
    use PacketKind::*;
    let syn = FrameBuilder::v4().tcp_options(20).tcp(SYN, &[]).build();
    let v6_syn = FrameBuilder::v6().tcp_options(20).tcp(SYN, &[]).build();
    vec![
        case("ipv4 syn", syn.clone(), &[Syn], None),
        case("ipv6 syn", v6_syn.clone(), &[Syn], None),
        case(
            "ipv4 syn-ack",
            FrameBuilder::v4().tcp(SYN | ACK, &[]).build(),
            &[SynAck],
            None,
        ),
        case(
            "ipv6 syn-ack",
            FrameBuilder::v6().tcp(SYN | ACK, &[]).build(),
            &[SynAck],
            None,
        ),
        case(
            "ipv4 fin",
            FrameBuilder::v4().tcp(FIN | ACK, &[]).build(),
            &[Fin],
            None,
        ),
        case(
            "ipv6 fin",
            FrameBuilder::v6().tcp(FIN | ACK, &[]).build(),
            &[Fin],
            None,
        ),
        case(
            "ipv4 rst",
            FrameBuilder::v4().tcp(RST, &[]).build(),
            &[Rst],
            None,
        ),
        case(
            "ipv6 rst",
            FrameBuilder::v6().tcp(RST | ACK, &[]).build(),
            &[Rst],
            None,
        ),
        case(
            "bare ack",
            FrameBuilder::v4().tcp(ACK, &[]).build(),
            &[],
            None,
        ),
        case(
            "client hello behind tcp options",
            FrameBuilder::v4()
                .tcp_options(12)
                .tcp(ACK | PSH, &client_hello_record())
                .build(),
            &[ClientHello],
            None,
        ),
        case(
            "ipv6 server hello",
            FrameBuilder::v6()
                .tcp(ACK | PSH, &server_hello_record())
                .build(),
            &[ServerHello],
            None,
        ),
        case(
            "client hello behind ipv4 options",
            FrameBuilder::v4()
                .ip_options(8)
                .tcp(ACK, &client_hello_record())
                .build(),
            &[ClientHello],
            None,
        ),
        case(
            "single vlan tag",
            FrameBuilder::v4().vlan(1).tcp(SYN, &[]).build(),
            &[Syn],
            None,
        ),
        case(
            "double vlan tag",
            FrameBuilder::v6().vlan(2).tcp(SYN | ACK, &[]).build(),
            &[SynAck],
            None,
        ),
        case(
            "ipv6 extension headers",
            FrameBuilder::v6()
                .ipv6_ext(0, 8)
                .ipv6_ext(43, 24)
                .ipv6_ext(60, 16)
                .tcp(SYN, &[])
                .build(),
            &[Syn],
            None,
        ),
        case(
            "ipv6 first fragment",
            FrameBuilder::v6().ipv6_fragment(0).tcp(SYN, &[]).build(),
            &[Syn],
            None,
        ),
        case(
            "ipv4 non-first fragment",
            FrameBuilder::v4()
                .fragment_offset(100)
                .tcp(SYN, &[])
                .build(),
            &[],
            None,
        ),
        case(
            "ipv6 non-first fragment",
            FrameBuilder::v6().ipv6_fragment(100).tcp(SYN, &[]).build(),
            &[],
            None,
        ),
        case("arp", arp_frame(), &[], None),
        case("ipv4 udp", FrameBuilder::v4().udp().build(), &[], None),
        case("ipv6 udp", FrameBuilder::v6().udp().build(), &[], None),
        case(
            "ethernet header only, vlan announced",
            FrameBuilder::v4().vlan(1).tcp(SYN, &[]).build()[..16].to_vec(),
            &[],
            Some(ParseError::VlanTruncated),
        ),
        case(
            "three vlan tags",
            FrameBuilder::v4().vlan(3).tcp(SYN, &[]).build(),
            &[],
            Some(ParseError::VlanTooDeep),
        ),
        case(
            "truncated ipv4",
            syn[..30].to_vec(),
            &[],
            Some(ParseError::Ipv4Truncated),
        ),
        case(
            "truncated ipv6",
            v6_syn[..40].to_vec(),
            &[],
            Some(ParseError::Ipv6Truncated),
        ),
        case(
            "ipv4 ihl < 5",
            FrameBuilder::v4().ihl(3).tcp(SYN, &[]).build(),
            &[],
            Some(ParseError::Ipv4BadHeader),
        ),
        case(
            "truncated tcp",
            syn[..44].to_vec(),
            &[],
            Some(ParseError::TcpTruncated),
        ),
        case(
            "tcp data offset < 5",
            FrameBuilder::v4().data_offset(2).tcp(SYN, &[]).build(),
            &[],
            Some(ParseError::TcpBadDataOffset),
        ),
        case(
            "tcp data offset past the end",
            FrameBuilder::v4().data_offset(15).tcp(SYN, &[]).build(),
            &[],
            Some(ParseError::TcpDataOffsetPastEnd),
        ),
        case(
            "truncated ipv6 extension",
            FrameBuilder::v6().ipv6_ext(60, 64).tcp(SYN, &[]).build()[..70].to_vec(),
            &[],
            Some(ParseError::Ipv6ExtensionTruncated),
        ),
    ]
}

/// The expected change of every counter for one frame through one hook.
fn expected(case: &Case, direction: Direction) -> KernelCounts {
    let mut want = KernelCounts::default();
    for kind in case.kinds {
        want.packets[direction as usize][*kind as usize] += 1;
    }
    if let Some(error) = case.error {
        want.parse_errors[error as usize] += 1;
    }
    want
}

fn delta(after: &KernelCounts, before: &KernelCounts) -> KernelCounts {
    let mut d = KernelCounts::default();
    for dir in 0..2 {
        for kind in 0..PacketKind::COUNT as usize {
            d.packets[dir][kind] = after.packets[dir][kind] - before.packets[dir][kind];
        }
    }
    for e in 0..ParseError::COUNT as usize {
        d.parse_errors[e] = after.parse_errors[e] - before.parse_errors[e];
    }
    d
}

#[test]
fn every_frame_passes_and_counts_exactly() {
    require_root();
    let _serial = serial();
    let mut observer = Observer::load().expect("load the kernel programs");
    let counters = observer.take_counters().expect("counter maps");
    let ebpf = observer.ebpf_mut();

    for case in cases() {
        for (hook, direction) in [
            (program::XDP_INGRESS, Direction::Ingress),
            (program::TC_INGRESS, Direction::Ingress),
            (program::TC_EGRESS, Direction::Egress),
        ] {
            let before = counters.read().expect("read counters");
            let (verdict, pass) = test_run(ebpf, hook, &case.frame);
            let verdict = match verdict {
                Ok(verdict) => verdict,
                // Kernels since 6.x check IP headers before building the
                // skb of a tc test run (EINVAL): such frames are exercised
                // through XDP only. Nothing may be counted.
                Err(e) if hook != program::XDP_INGRESS && case.error.is_some() && is_einval(&e) => {
                    eprintln!(
                        "{}: the kernel refuses to test-run it through {hook} ({e}); XDP covers it",
                        case.name
                    );
                    assert_eq!(counters.read().expect("read counters"), before);
                    continue;
                }
                Err(e) => panic!("{}: test run of {hook} failed: {e:?}", case.name),
            };
            assert_eq!(
                verdict.return_value, pass,
                "{}: {hook} must pass every frame",
                case.name
            );
            let after = counters.read().expect("read counters");
            assert_eq!(
                delta(&after, &before),
                expected(&case, direction),
                "{}: counters after {hook} (frame {:02x?})",
                case.name,
                case.frame
            );
        }
    }
}

/// Runs `frame` through packet hook `hook` with BPF_PROG_TEST_RUN: the
/// kernel's answer, and the verdict that passes a frame on for that hook.
fn test_run(
    ebpf: &mut aya::Ebpf,
    hook: &str,
    frame: &[u8],
) -> (Result<aya::programs::TestRunResult, ProgramError>, u32) {
    let prog = ebpf.program_mut(hook).expect("program");
    let opts = TestRunOptions {
        data_in: Some(frame),
        ..Default::default()
    };
    if hook == program::XDP_INGRESS {
        let xdp: &mut Xdp = prog.try_into().expect("xdp program");
        (xdp.test_run(opts), XDP_PASS)
    } else {
        let tc: &mut SchedClassifier = prog.try_into().expect("tc program");
        (tc.test_run(opts), TC_ACT_UNSPEC)
    }
}

/// The kernel's refusal to test-run a frame (EINVAL), not any other
/// failure.
fn is_einval(error: &ProgramError) -> bool {
    matches!(error, ProgramError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::EINVAL))
}

/// Below 14 bytes the kernel refuses to run XDP at all (EINVAL on 6.18),
/// and nothing is counted; at exactly 14 bytes our program runs, passes
/// the frame, and counts the header its ethertype promised as truncated.
#[test]
fn the_shortest_frames_pass_and_count_what_they_lack() {
    require_root();
    let _serial = serial();
    let mut observer = Observer::load().expect("load the kernel programs");
    let counters = observer.take_counters().expect("counter maps");
    let xdp: &mut Xdp = observer
        .ebpf_mut()
        .program_mut(program::XDP_INGRESS)
        .expect("program")
        .try_into()
        .expect("xdp program");
    let run = |xdp: &mut Xdp, frame: &[u8]| {
        xdp.test_run(TestRunOptions {
            data_in: Some(frame),
            ..Default::default()
        })
    };
    let before = counters.read().expect("read counters");
    let error = run(xdp, &[0u8; 13]).expect_err("a 13-byte frame ran");
    assert!(is_einval(&error), "{error:?}");
    assert_eq!(counters.read().expect("read counters"), before);

    for (ethertype, error) in [
        (0x0800u16, ParseError::Ipv4Truncated),
        (0x86dd, ParseError::Ipv6Truncated),
        (0x8100, ParseError::VlanTruncated),
    ] {
        let mut frame = [0u8; 14];
        frame[12..].copy_from_slice(&ethertype.to_be_bytes());
        let before = counters.read().expect("read counters");
        let verdict = run(xdp, &frame).expect("a 14-byte frame runs");
        assert_eq!(verdict.return_value, XDP_PASS, "{ethertype:#06x}");
        let after = counters.read().expect("read counters");
        let mut want = KernelCounts::default();
        want.parse_errors[error as usize] = 1;
        assert_eq!(delta(&after, &before), want, "ethertype {ethertype:#06x}");
    }
}

/// The object holds exactly the programs and maps `abi` names: a name
/// changed on one side only fails here, not at a user's first start.
#[test]
fn the_object_holds_exactly_the_named_programs_and_maps() {
    require_root();
    let _serial = serial();
    let ebpf = aya::EbpfLoader::new()
        .load(EBPF_OBJECT)
        .expect("parse the eBPF object");
    let mut programs: Vec<&str> = ebpf.programs().map(|(name, _)| name).collect();
    programs.sort_unstable();
    let mut named = program::ALL.to_vec();
    named.sort_unstable();
    assert_eq!(programs, named, "programs");
    // Globals live in sections the loader turns into maps of their own.
    let mut maps: Vec<&str> = ebpf
        .maps()
        .map(|(name, _)| name)
        .filter(|name| !name.starts_with('.'))
        .collect();
    maps.sort_unstable();
    let mut named = map::ALL.to_vec();
    named.sort_unstable();
    assert_eq!(maps, named, "maps");
}

/// What the kernel programs must count for `frame`, from the same parser
/// run in userspace: one parse error, or the packet kinds the segment
/// carries (as `observe` in the eBPF crate counts them), or nothing for
/// traffic that is not TCP.
fn reference(frame: &[u8], direction: Direction) -> KernelCounts {
    use handshake_common::{packet::parse_tcp, tls::HelloKind};
    let mut want = KernelCounts::default();
    match parse_tcp(frame) {
        Err(error) => want.parse_errors[error as usize] += 1,
        Ok(None) => {}
        Ok(Some(segment)) => {
            let mut count = |kind: PacketKind| want.packets[direction as usize][kind as usize] += 1;
            if segment.is_syn() {
                count(PacketKind::Syn);
            } else if segment.is_syn_ack() {
                count(PacketKind::SynAck);
            }
            if segment.has(FIN) {
                count(PacketKind::Fin);
            }
            if segment.has(RST) {
                count(PacketKind::Rst);
            }
            match segment.tls_hello(frame) {
                Some(HelloKind::Client) => count(PacketKind::ClientHello),
                Some(HelloKind::Server) => count(PacketKind::ServerHello),
                None => {}
            }
        }
    }
    want
}

/// A reproducible corpus of malformed and truncated frames: every
/// well-formed case cut at every length from 14 bytes, and each with one
/// to four bytes of its headers overwritten (seeded, so a failure names a
/// frame that can be rebuilt).
fn malformed_corpus() -> Vec<Vec<u8>> {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let bases: Vec<Vec<u8>> = cases().into_iter().map(|c| c.frame).collect();
    let mut corpus = Vec::new();
    for base in &bases {
        for len in (14..base.len()).step_by(3) {
            corpus.push(base[..len].to_vec());
        }
        for _ in 0..24 {
            let mut frame = base.clone();
            // Headers live in the first 120 bytes (VLANs, IPv6 extensions).
            let headers = frame.len().min(120);
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % headers;
                frame[at] = next() as u8;
            }
            corpus.push(frame);
        }
    }
    corpus
}

/// BPF_PROG_TEST_RUN over the malformed corpus, through all three packet
/// hooks: every verdict is pass, and the kernel counts exactly what the
/// userspace parser says of each frame — each failure as its one parse
/// error. Frames the kernel itself refuses to run through tc (EINVAL on
/// bad IP headers) must count nothing.
#[test]
fn a_corpus_of_malformed_frames_passes_and_counts_as_the_parser_says() {
    require_root();
    let _serial = serial();
    let corpus = malformed_corpus();
    assert!(corpus.len() >= 1000, "{} frames", corpus.len());
    let mut observer = Observer::load().expect("load the kernel programs");
    let counters = observer.take_counters().expect("counter maps");
    let ebpf = observer.ebpf_mut();
    let (mut runs, mut refused, mut errors) = (0u64, 0u64, 0u64);
    for (n, frame) in corpus.iter().enumerate() {
        for (hook, direction) in [
            (program::XDP_INGRESS, Direction::Ingress),
            (program::TC_INGRESS, Direction::Ingress),
            (program::TC_EGRESS, Direction::Egress),
        ] {
            let before = counters.read().expect("read counters");
            let (verdict, pass) = test_run(ebpf, hook, frame);
            let after = counters.read().expect("read counters");
            match verdict {
                Ok(verdict) => {
                    runs += 1;
                    assert_eq!(
                        verdict.return_value, pass,
                        "frame {n} through {hook}: {frame:02x?}"
                    );
                    let want = reference(frame, direction);
                    errors += want.parse_errors.iter().sum::<u64>();
                    assert_eq!(
                        delta(&after, &before),
                        want,
                        "frame {n} through {hook}: {frame:02x?}"
                    );
                }
                Err(e) if hook != program::XDP_INGRESS && is_einval(&e) => {
                    refused += 1;
                    assert_eq!(after, before, "frame {n}: refused, yet counted");
                }
                Err(e) => panic!("frame {n}: test run of {hook} failed: {e:?}"),
            }
        }
    }
    eprintln!(
        "{} frames: {runs} runs passed and counted as the parser says ({errors} parse errors), \
         {refused} refused by the kernel before our tc programs",
        corpus.len()
    );
}
