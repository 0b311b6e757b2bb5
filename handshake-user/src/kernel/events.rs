//! The ring buffers (decided handshakes, TLS hello bytes): waiting for
//! them without spinning, and decoding their records. The kernel batches wakeups, so the reader also
//! drains on a short timer: a batch never waits longer than `DRAIN_EVERY`.

use std::time::Duration;

use aya::{
    Pod,
    maps::{MapData, RingBuf},
};
use handshake_common::flow::Flow;
use tokio::io::unix::AsyncFd;

/// How long a record may wait for a wakeup before the reader looks anyway.
pub const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// Hands one ring-buffer record to `apply` where it lies in the ring (its
/// size checked; a TLS record is over a kilobyte, not worth a copy);
/// false if its size is not a `T`'s.
pub fn with_record<T: Pod>(bytes: &[u8], apply: impl FnOnce(&T)) -> bool {
    if bytes.len() != size_of::<T>() {
        return false;
    }
    let ptr = bytes.as_ptr().cast::<T>();
    if ptr.is_aligned() {
        // SAFETY: the length was checked, the pointer is aligned, and
        // `T: Pod` is valid for any bit pattern; the ring's consumer
        // position moves past the record only after this borrow ends.
        apply(unsafe { &*ptr });
    } else {
        // SAFETY: as above; read_unaligned has no alignment requirement.
        apply(&unsafe { std::ptr::read_unaligned(ptr) });
    }
    true
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

impl<T: Pod> EventReader<T> {
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

    /// Waits for a wakeup or `DRAIN_EVERY`, whichever comes first.
    pub async fn wait(&mut self) -> std::io::Result<()> {
        if let Ok(guard) = tokio::time::timeout(DRAIN_EVERY, self.ring.readable_mut()).await {
            guard?.clear_ready();
        }
        Ok(())
    }

    /// Hands every waiting record to `apply`, in order, where it lies.
    pub fn drain(&mut self, mut apply: impl FnMut(&T)) {
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            if !with_record(&item, &mut apply) {
                self.malformed += 1;
            }
        }
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
        let decode = |bytes: &[u8]| {
            let mut out = None;
            with_record(bytes, |f: &Flow| out = Some(*f)).then_some(())?;
            out
        };
        assert_eq!(decode(bytes), Some(flow));
        // Unaligned: copied out first.
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(bytes);
        assert_eq!(decode(&shifted[1..]), Some(flow));
        assert_eq!(decode(&bytes[1..]), None);
        assert_eq!(decode(&[]), None);
    }
}
