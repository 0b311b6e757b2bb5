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
    position: RingPosition,
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
        let position = {
            use std::os::fd::AsFd as _;
            RingPosition::of(ring.get_ref().as_fd())?
        };
        Ok(Self {
            ring,
            position,
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

    /// How far it has read (for a checkpoint: `daemon::persist`).
    pub fn position(&self) -> u64 {
        self.position.read()
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

/// A shared mapping of a BPF map's memory: an mmappable array's values,
/// or a ring buffer's positions.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, read with volatile loads.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Maps the values of `map`, `bytes` of them, read-only.
    fn new(map: &MapData, bytes: usize) -> std::io::Result<Self> {
        use std::os::fd::AsFd as _;
        Self::of(map.fd().as_fd(), bytes, 0, false)
    }

    /// Maps `bytes` of the map `fd` from page `page_index`, writable or not.
    fn of(
        fd: std::os::fd::BorrowedFd<'_>,
        bytes: usize,
        page_index: usize,
        writable: bool,
    ) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd as _;
        let page = page_size();
        let len = bytes.div_ceil(page) * page;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks
        // the length, the offset and the protection against the map.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                (page_index * page) as libc::off_t,
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

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// How far a ring buffer's reader has read: bytes since the ring was
/// made (the kernel's consumer position, in its first page).
pub struct RingPosition(Mapping);

// SAFETY: as `Mapping`'s.
unsafe impl Sync for RingPosition {}

impl RingPosition {
    pub fn of(ring: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Self> {
        Mapping::of(ring, page_size(), 0, false).map(Self)
    }

    pub fn read(&self) -> u64 {
        // SAFETY: the first word of the first page is the consumer
        // position, which the mapping covers.
        unsafe { self.0.read::<u64>(0) }
    }
}

/// Moves a ring buffer's reader back to `to`, so that the records since
/// are read again: those a daemon before this one read after its last
/// checkpoint. Only if they are all still there (the writer has not
/// written `data_bytes` past `to`) and `to` is not ahead of the reader;
/// false otherwise, and nothing changes.
pub fn rewind_ring(
    ring: std::os::fd::BorrowedFd<'_>,
    to: u64,
    data_bytes: u64,
) -> std::io::Result<bool> {
    let page = page_size();
    let consumer = Mapping::of(ring, page, 0, true)?;
    let producer = Mapping::of(ring, page, 1, false)?;
    // SAFETY: the first word of each page: consumer and producer positions.
    let (read, written) = unsafe { (consumer.read::<u64>(0), producer.read::<u64>(0)) };
    if to > read || written.saturating_sub(to) > data_bytes {
        return Ok(false);
    }
    // SAFETY: the consumer page is mapped writable; the kernel reads the
    // position only to know how much room is free, and less is safe.
    unsafe { std::ptr::write_volatile(consumer.ptr.cast::<u64>(), to) };
    Ok(true)
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

    /// How far it has read on each CPU (for a checkpoint).
    pub fn positions(&self) -> &[u64] {
        &self.read
    }

    /// Reads on from where a daemon before this one stood (`read`, per
    /// CPU) rather than from now: what it read after its last checkpoint
    /// is read again, and what was written while no daemon ran is read.
    /// A position ahead of the log (a log made anew) is ignored. Returns
    /// the records to be read again or caught up.
    pub fn resume(&mut self, read: &[u64], lost: u64) -> u64 {
        self.lost = lost;
        let mut behind = 0;
        for (cpu, at) in read.iter().enumerate().take(self.read.len()) {
            let head = self.head(cpu);
            if *at <= head {
                self.read[cpu] = *at;
                behind += head - at;
            }
        }
        behind
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
