//! The ring buffers (decided handshakes, TLS hello bytes): waiting for
//! them without spinning, and decoding their records. The kernel batches wakeups, so the reader also
//! drains on a short timer: a batch never waits longer than `DRAIN_EVERY`.

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use handshake_common::{abi::tls_capture::TlsChunk, flow::Flow};
use tokio::io::unix::AsyncFd;

/// How long a record may wait for a wakeup before the reader looks anyway.
pub const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// A ring-buffer record type: `repr(C)` plain data, valid for any bit
/// pattern.
///
/// # Safety
/// Implement only for such types.
pub unsafe trait Record: Copy {}

// SAFETY: `repr(C)` integers and byte arrays.
unsafe impl Record for Flow {}
// SAFETY: as above.
unsafe impl Record for TlsChunk {}

/// Decodes one ring-buffer record; `None` if its size is not a `T`'s.
pub fn decode<T: Record>(bytes: &[u8]) -> Option<T> {
    if bytes.len() != size_of::<T>() {
        return None;
    }
    // SAFETY: the length was checked, `T: Record` is valid for any bit
    // pattern, and read_unaligned has no alignment requirement.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

pub struct EventReader<T = Flow> {
    ring: AsyncFd<RingBuf<MapData>>,
    /// Records of the wrong size (a kernel/user mismatch; should stay 0).
    pub malformed: u64,
    record: std::marker::PhantomData<T>,
}

impl<T> std::fmt::Debug for EventReader<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReader")
            .field("malformed", &self.malformed)
            .finish_non_exhaustive()
    }
}

impl<T: Record> EventReader<T> {
    /// Must be called inside a tokio runtime.
    pub fn new(ring: RingBuf<MapData>) -> std::io::Result<Self> {
        // SAFETY: the ring buffer owns its map fd, which stays open and
        // unchanged for as long as the AsyncFd (which owns the ring) lives.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?;
        Ok(Self {
            ring,
            malformed: 0,
            record: std::marker::PhantomData,
        })
    }

    /// Waits for a wakeup or `DRAIN_EVERY`, then appends every waiting
    /// record to `out`.
    pub async fn next_batch(&mut self, out: &mut Vec<T>) -> std::io::Result<()> {
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
        assert_eq!(decode::<Flow>(&bytes[1..]), None);
        assert_eq!(decode::<Flow>(&[]), None);
    }
}
