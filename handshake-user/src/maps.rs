//! The only module that touches aya map types: it owns the counter maps and
//! turns them into a plain [`Snapshot`], summed over CPUs.

use aya::{
    Ebpf,
    maps::{MapData, MapError, PerCpuArray},
};
use handshake_common::abi::{self, Direction, PacketKind, ParseError, STATE_SLOTS, map as names};

use crate::loader::LoadError;

/// Counts read from the kernel at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// `packets[direction][kind]`.
    pub packets: [[u64; PacketKind::COUNT as usize]; 2],
    /// Indexed by [`ParseError`] code.
    pub parse_errors: [u64; ParseError::COUNT as usize],
    /// Non-zero (from, to, count) state transitions.
    pub transitions: Vec<(u32, u32, u64)>,
}

impl Snapshot {
    pub fn packets(&self, direction: Direction, kind: PacketKind) -> u64 {
        self.packets[direction as usize][kind as usize]
    }

    pub fn parse_error(&self, error: ParseError) -> u64 {
        self.parse_errors[error as usize]
    }

    pub fn transition(&self, from: u32, to: u32) -> u64 {
        self.transitions
            .iter()
            .find(|(f, t, _)| (*f, *t) == (from, to))
            .map_or(0, |(_, _, n)| *n)
    }
}

/// The per-CPU counter maps.
pub struct Counters {
    packets: PerCpuArray<MapData, u64>,
    parse_errors: PerCpuArray<MapData, u64>,
    transitions: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters").finish_non_exhaustive()
    }
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<PerCpuArray<MapData, u64>, LoadError> {
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    PerCpuArray::try_from(map).map_err(|source| LoadError::Map { name, source })
}

fn sum(map: &PerCpuArray<MapData, u64>, index: u32) -> Result<u64, MapError> {
    Ok(map.get(&index, 0)?.iter().sum())
}

impl Counters {
    pub(crate) fn take_from(ebpf: &mut Ebpf) -> Result<Self, LoadError> {
        Ok(Self {
            packets: take(ebpf, names::PACKET_COUNTS)?,
            parse_errors: take(ebpf, names::PARSE_ERRORS)?,
            transitions: take(ebpf, names::TRANSITIONS)?,
        })
    }

    pub fn snapshot(&self) -> Result<Snapshot, MapError> {
        let mut snapshot = Snapshot::default();
        for direction in Direction::ALL {
            for kind in PacketKind::ALL {
                let index = abi::packet_count_index(direction, kind);
                snapshot.packets[direction as usize][kind as usize] = sum(&self.packets, index)?;
            }
        }
        for error in ParseError::ALL {
            snapshot.parse_errors[error as usize] = sum(&self.parse_errors, error as u32)?;
        }
        for (index, values) in self.transitions.iter().enumerate() {
            let count: u64 = values?.iter().sum();
            if count > 0 {
                let index = index as u32;
                snapshot
                    .transitions
                    .push((index / STATE_SLOTS, index % STATE_SLOTS, count));
            }
        }
        Ok(snapshot)
    }
}
