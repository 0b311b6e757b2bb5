//! The ring buffer of decided handshakes: waiting for it without spinning,
//! and decoding its records. The kernel batches wakeups, so the reader also
//! drains on a short timer: a batch never waits longer than `DRAIN_EVERY`.

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use handshake_common::flow::Flow;
use tokio::io::unix::AsyncFd;

/// How long a record may wait for a wakeup before the reader looks anyway.
pub const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// Decodes one ring-buffer record; `None` if its size is not a `Flow`'s.
pub fn decode(bytes: &[u8]) -> Option<Flow> {
    if bytes.len() != size_of::<Flow>() {
        return None;
    }
    // SAFETY: the length was checked, `Flow` is `repr(C)` plain data valid
    // for any bit pattern, and read_unaligned has no alignment requirement.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Flow>()) })
}

pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    /// Records of the wrong size (a kernel/user mismatch; should stay 0).
    pub malformed: u64,
}

impl std::fmt::Debug for EventReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReader")
            .field("malformed", &self.malformed)
            .finish_non_exhaustive()
    }
}

impl EventReader {
    /// Must be called inside a tokio runtime.
    pub fn new(ring: RingBuf<MapData>) -> std::io::Result<Self> {
        // SAFETY: the ring buffer owns its map fd, which stays open and
        // unchanged for as long as the AsyncFd (which owns the ring) lives.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?;
        Ok(Self { ring, malformed: 0 })
    }

    /// Waits for a wakeup or `DRAIN_EVERY`, then appends every waiting
    /// record to `out`.
    pub async fn next_batch(&mut self, out: &mut Vec<Flow>) -> std::io::Result<()> {
        if let Ok(guard) = tokio::time::timeout(DRAIN_EVERY, self.ring.readable_mut()).await {
            guard?.clear_ready();
        }
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            match decode(&item) {
                Some(flow) => out.push(flow),
                None => self.malformed += 1,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_exactly_one_flow_and_nothing_else() {
        let flow = Flow {
            ts_syn: 7,
            client_port: 40000,
            server_port: 443,
            outcome: 1,
            ..Flow::default()
        };
        // SAFETY: viewing a repr(C) value as its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const flow).cast::<u8>(), size_of::<Flow>())
        };
        assert_eq!(decode(bytes), Some(flow));
        assert_eq!(decode(&bytes[1..]), None);
        assert_eq!(decode(&[]), None);
    }
}
