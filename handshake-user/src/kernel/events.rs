//! The ring buffers (decided handshakes, TLS hello bytes): waiting for
//! them without spinning, and decoding their records. The kernel batches wakeups, so the reader also
//! drains on a short timer: a batch never waits longer than `DRAIN_EVERY`.

use std::time::Duration;

use aya::{
    Pod,
    maps::{MapData, RingBuf},
};
use handshake_common::{
    abi::socket::{HEAD_STRIDE, LOG_SLOTS, SockHandshake},
    flow::Flow,
};
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

/// A read-only mapping of an mmappable BPF array.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, read with volatile loads.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Maps the values of `map`, `bytes` of them.
    fn new(map: &MapData, bytes: usize) -> std::io::Result<Self> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = bytes.div_ceil(page) * page;
        // SAFETY: a fresh shared read-only mapping of the map's fd; the
        // kernel checks the length against the map.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { ptr, len })
    }

    /// The `T` at index `i` of the array, read once.
    ///
    /// # Safety
    /// `i` must lie within the mapping.
    unsafe fn read<T: Pod>(&self, i: usize) -> T {
        debug_assert!((i + 1) * size_of::<T>() <= self.len);
        // SAFETY: the caller's bound; `T: Pod` is valid for any bits.
        unsafe { std::ptr::read_volatile(self.ptr.cast::<T>().add(i)) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps what `new` mapped, once.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// The socket layer's records: a ring per CPU in an array shared with the
/// kernel (`abi::socket`), read every [`DRAIN_EVERY`]. No wakeup, no
/// syscall: the reader compares each CPU's count with its own.
pub struct CpuLog {
    records: Mapping,
    heads: Mapping,
    /// Records read so far, per CPU.
    read: Vec<u64>,
    /// Records a CPU overwrote before they were read.
    pub lost: u64,
    _maps: (MapData, MapData),
}

impl std::fmt::Debug for CpuLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuLog")
            .field("cpus", &self.read.len())
            .field("lost", &self.lost)
            .finish_non_exhaustive()
    }
}

impl CpuLog {
    /// Maps `records` and `heads`, sized for `cpus` CPUs at load.
    pub fn new(records: MapData, heads: MapData, cpus: u32) -> std::io::Result<Self> {
        let cpus = cpus as usize;
        let records_map = Mapping::new(
            &records,
            cpus * LOG_SLOTS as usize * size_of::<SockHandshake>(),
        )?;
        let heads_map = Mapping::new(&heads, cpus * HEAD_STRIDE as usize * size_of::<u64>())?;
        let mut log = Self {
            records: records_map,
            heads: heads_map,
            read: vec![0; cpus],
            lost: 0,
            _maps: (records, heads),
        };
        for cpu in 0..cpus {
            log.read[cpu] = log.head(cpu);
        }
        Ok(log)
    }

    fn head(&self, cpu: usize) -> u64 {
        // SAFETY: `cpu` is below the CPUs the heads were sized for.
        let head = unsafe { self.heads.read::<u64>(cpu * HEAD_STRIDE as usize) };
        // The records before the count that covers them (the writer's
        // stores are in order).
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        head
    }

    /// Waits until the next read is due.
    pub async fn wait(&mut self) {
        tokio::time::sleep(DRAIN_EVERY).await;
    }

    /// Hands every record written since the last call to `apply`, CPU by
    /// CPU, each CPU's in order; counts in `lost` those overwritten
    /// before they could be read.
    pub fn drain(&mut self, mut apply: impl FnMut(&SockHandshake)) {
        let slots = u64::from(LOG_SLOTS);
        for cpu in 0..self.read.len() {
            let head = self.head(cpu);
            let mut from = self.read[cpu];
            if head.saturating_sub(from) > slots {
                self.lost += head - from - slots;
                from = head - slots;
            }
            let base = cpu * LOG_SLOTS as usize;
            for seq in from..head {
                // SAFETY: the index lies in this CPU's ring.
                let record: SockHandshake =
                    unsafe { self.records.read(base + (seq % slots) as usize) };
                // The writer may have lapped the reader while it read: a
                // record is whole if its slot was not written again
                // since (the writer's next index is at most the count).
                if self.head(cpu) >= seq + slots {
                    self.lost += 1;
                    continue;
                }
                apply(&record);
            }
            self.read[cpu] = head;
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
