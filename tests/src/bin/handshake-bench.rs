//! `cargo xtask bench`: what the ingress program costs per frame, as a
//! ratio to a pass-only XDP program from the same object, both driven by
//! BPF_PROG_TEST_RUN in the same run, in interleaved rounds.
//!
//! Each measurement is one BPF_PROG_TEST_RUN call repeating the frame
//! `REPEAT` times. The kernel runs the repeats in the calling thread, so the
//! per-frame time is that thread's CPU time over `REPEAT`: sub-nanosecond
//! resolution, and time spent descheduled (the kernel yields every few
//! thousand repeats) is not counted. The kernel's own figure, whole
//! nanoseconds, is printed beside it.

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use handshake_common::{
    abi::program,
    packet::tcp_flags::{ACK, PSH, SYN},
    testframes::{FrameBuilder, client_hello_record},
};
use handshake_user::loader::Observer;

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 7;

struct Sample {
    cpu_ns: f64,
    kernel_ns: u128,
}

fn measure(observer: &mut Observer, name: &str, frame: &[u8]) -> Sample {
    let prog: &mut Xdp = observer
        .ebpf_mut()
        .program_mut(name)
        .unwrap_or_else(|| panic!("no program {name}"))
        .try_into()
        .expect("an XDP program");
    let start = thread_cpu_ns();
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat: REPEAT,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("test run of {name}: {e}"));
    let cpu = thread_cpu_ns() - start;
    Sample {
        cpu_ns: cpu as f64 / f64::from(REPEAT),
        kernel_ns: result.duration.as_nanos(),
    }
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let mut observer = Observer::load().expect("load the kernel programs (run as root)");
    // The baseline is loaded on demand: the daemon never loads it.
    {
        let base: &mut Xdp = observer
            .ebpf_mut()
            .program_mut(program::XDP_PASS_BASELINE)
            .expect("baseline program")
            .try_into()
            .expect("an XDP program");
        base.load().expect("load the baseline");
    }
    let frames = [
        (
            "bare ACK (IPv4, data frame)",
            FrameBuilder::v4().tcp_options(12).tcp(ACK, &[]).build(),
        ),
        (
            "SYN (IPv4, 20 B options)",
            FrameBuilder::v4().tcp_options(20).tcp(SYN, &[]).build(),
        ),
        (
            "SYN (IPv6, 20 B options)",
            FrameBuilder::v6().tcp_options(20).tcp(SYN, &[]).build(),
        ),
        (
            "ClientHello (IPv4)",
            FrameBuilder::v4()
                .tcp_options(12)
                .tcp(ACK | PSH, &client_hello_record())
                .build(),
        ),
    ];

    println!(
        "XDP ingress cost per frame, BPF_PROG_TEST_RUN, {REPEAT} repeats x {ROUNDS} interleaved rounds"
    );
    println!(
        "{:<30} {:>10} {:>10} {:>8} {:>8} {:>8} {:>12}",
        "frame", "pass ns", "ours ns", "ratio", "min", "max", "kernel ns"
    );
    for (label, frame) in &frames {
        let (mut base, mut ours, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let mut kernel = (0u128, 0u128);
        for _ in 0..ROUNDS {
            let b = measure(&mut observer, program::XDP_PASS_BASELINE, frame);
            let o = measure(&mut observer, program::XDP_INGRESS, frame);
            ratios.push(o.cpu_ns / b.cpu_ns);
            base.push(b.cpu_ns);
            ours.push(o.cpu_ns);
            kernel = (b.kernel_ns, o.kernel_ns);
        }
        let (min, max) = ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        println!(
            "{:<30} {:>10.1} {:>10.1} {:>8.2} {:>8.2} {:>8.2} {:>6} / {:<4}",
            label,
            median(&mut base),
            median(&mut ours),
            median(&mut ratios),
            min,
            max,
            kernel.0,
            kernel.1
        );
    }
    println!(
        "ratio = ours / pass-only, median of the per-round ratios; kernel ns = the kernel's own per-run figure (last round, pass / ours)"
    );
}
