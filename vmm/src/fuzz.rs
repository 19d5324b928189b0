//! Entry points for the fuzzer: each takes bytes another party could hand the VMM and runs
//! them through the code that reads them, checking what must hold for any input (no panic,
//! no allocation beyond what arrived, a state that loads is one this VMM can write again). The
//! cargo-fuzz targets in `vmm/fuzz` call these, and so does this crate's test suite for every
//! file of their checked-in corpora (`vmm/fuzz/corpus/<target>/`), on the stable toolchain.
//!
//! | target | bytes from | code |
//! |---|---|---|
//! | [`migration_stream`] | a migration's source | [`receive_stream`] into guest memory |
//! | [`saved_state`] | a source or a snapshot file | [`persist::decode`], then the devices' `restore` |
//! | [`snapshot`] | a snapshot file | [`Header::decode`], then [`persist::decode`] |
//!
//! Checksums would stop a fuzzer at the first byte it changes, so where an input's first
//! byte has bit 0 set, the entry point makes them right itself (a stream from frame specs, a
//! state envelope around a payload, a header with its CRC); with bit 0 clear the bytes go in
//! as they are. The descriptor chains a guest puts in a virtqueue are fuzzed in
//! `vmm_disk::fuzz`.

use crate::devices::i8042::I8042;
use crate::devices::serial::{ConsoleOut, InputEvents, SerialDevice};
use crate::devices::virtio::block::{Backend, Block, Disk, FileBackend};
use crate::devices::virtio::disk::DiskDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::VirtioInterrupt;
use crate::devices::IrqLine;
use crate::memory::{self, GuestMem};
use crate::migration::receive::{receive_stream, CommitDone, Incoming, ReceiveError};
use crate::migration::wire::{self, Commit};
use crate::migration::SharedStatus;
use crate::persist::{self, Persist, Shape, VmState};
use crate::snapshot::Header;
use crate::vm::VmError;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// The fuzz targets by name, for the corpus regression test.
pub const TARGETS: [(&str, Target); 3] = [
    ("migration_stream", migration_stream),
    ("saved_state", saved_state),
    ("snapshot", snapshot),
];

/// The shape of the VM the fuzzed streams and states are for.
pub fn shape() -> Shape {
    Shape {
        memory_mib: MEM_MIB,
        vcpus: 1,
        disks: 1,
    }
}

/// Guest memory of the fuzzed VM.
const MEM_MIB: u64 = 2;
/// Size of the fuzzed VM's disk.
pub const DISK_BYTES: u64 = 1 << 20;
/// Disks restored from one state at most (each costs a transport).
const MAX_DISKS: usize = 4;

/// What the process keeps for every input: guest memory, a disk, and a runtime its block
/// devices are bound to (never driven: nothing is activated).
struct Rig {
    mem: Arc<GuestMem>,
    disk: Disk,
    runtime: tokio::runtime::Runtime,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let (mem, _) = memory::create_guest_memory(MEM_MIB).expect("guest memory");
        let fd = nix::sys::memfd::memfd_create(c"fuzz-disk", nix::sys::memfd::MFdFlags::empty())
            .expect("memfd");
        let file = std::fs::File::from(fd);
        file.set_len(DISK_BYTES).expect("size the disk");
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let backend = FileBackend::open(Path::new(&path), false).expect("open the disk");
        Rig {
            mem,
            disk: Disk::new(Backend::File(backend), false, "fuzz"),
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime"),
        }
    })
}

/// The VM a fuzzed stream arrives into: the state is decoded and checked as the VM loop
/// would before loading it; the hand-over is acknowledged.
struct Destination {
    shape: Shape,
    status: SharedStatus,
}

impl Incoming for Destination {
    fn shape(&self) -> &Shape {
        &self.shape
    }

    fn mem(&self) -> &GuestMem {
        &rig().mem
    }

    fn status(&self) -> &SharedStatus {
        &self.status
    }

    fn load_state(&mut self, state: Vec<u8>) -> Result<(), ReceiveError> {
        let st = persist::decode(&state).map_err(|e| ReceiveError::Load(VmError::State(e)))?;
        st.check_shape(&self.shape)
            .map_err(|e| ReceiveError::Load(VmError::State(e)))
    }

    fn commit(&mut self, _c: Commit, _auto: bool) -> Option<CommitDone> {
        Some(CommitDone { resumed_at_us: 0 })
    }
}

/// A migration stream from a source, as the destination reads it. Bit 0 of the first byte
/// set: the rest is frame specs (`u8 kind | u16 length | payload`) that become a valid
/// stream (preamble, checksums); clear: the rest is the stream.
pub fn migration_stream(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let stream = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        frames(rest)
    };
    let mut dest = Destination {
        shape: shape(),
        status: Default::default(),
    };
    let mut answers = Vec::new();
    let _ = receive_stream(&stream[..], &mut answers, &mut dest);
}

/// A stream with a valid preamble and checksums from frame specs.
pub fn frames(mut specs: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = wire::write_preamble(&mut out);
    while let [kind, a, b, rest @ ..] = specs {
        let len = usize::from(u16::from_le_bytes([*a, *b])).min(rest.len());
        let (payload, tail) = rest.split_at(len);
        let mut h = [0u8; wire::FRAME_HEADER];
        h[0] = *kind;
        h[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        h[8..12].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(payload);
        specs = tail;
    }
    out
}

/// A saved state, as a restoring VMM reads it: decoded, checked against its own shape, and
/// restored into fresh devices (the UART, the i8042, a virtio-mmio block device per disk;
/// the KVM parts need a VM and are left to KVM's own checks). Bit 0 of the first byte set:
/// the rest is the payload (JSON) and gets a valid envelope; clear: the rest is the envelope.
pub fn saved_state(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let envelope = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        envelope(rest)
    };
    if let Ok(st) = persist::decode(&envelope) {
        restore(&st);
    }
}

/// `payload` in a valid state envelope.
pub fn envelope(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + payload.len());
    out.extend_from_slice(persist::STATE_MAGIC);
    out.extend_from_slice(&persist::STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn restore(st: &VmState) {
    // What loads is what this VMM writes and reads again.
    let again = persist::encode(st).expect("a decoded state encodes");
    let back = persist::decode(&again).expect("an encoded state decodes");
    assert_eq!(persist::encode(&back).expect("encodes"), again);
    if st.check_shape(&st.shape).is_err() {
        return;
    }
    let rig = rig();
    let line = || IrqLine {
        evt: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        gsi: 5,
    };
    let (out, _console) = std::sync::mpsc::channel();
    let events = InputEvents {
        fifo_empty: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
    };
    let mut serial = SerialDevice::new(line(), events, ConsoleOut(out), true);
    if serial.restore(&st.serial).is_ok() {
        use crate::bus::BusDevice;
        let mut byte = [0u8];
        for reg in 0..8 {
            serial.read(reg, &mut byte);
        }
    }
    let (events, _) = std::sync::mpsc::channel();
    let _ = I8042::new(events).restore(&st.i8042);
    for saved in st.disks.iter().take(MAX_DISKS) {
        let block = Block::new(rig.disk.clone(), rig.runtime.handle().clone());
        let mut t = MmioTransport::new(
            DiskDevice::Block(block),
            rig.mem.clone(),
            Arc::new(VirtioInterrupt::new(line())),
            vec![EventFd::new(EFD_NONBLOCK).expect("eventfd")],
        );
        if t.restore(saved).is_ok() {
            use crate::bus::BusDevice;
            let mut word = [0u8; 4];
            for reg in (0..0x100).step_by(4) {
                t.read(reg, &mut word);
            }
        }
    }
}

/// A snapshot file's first bytes, as `vmm run --restore` reads them: the header, checked
/// against the file's size, then the state envelope where the header says it is. The first
/// byte: bit 0 set, the header's CRC is made right; the next 8 bytes are the file's size.
pub fn snapshot(data: &[u8]) {
    let [mode, s0, s1, s2, s3, s4, s5, s6, s7, rest @ ..] = data else {
        return;
    };
    let size = u64::from_le_bytes([*s0, *s1, *s2, *s3, *s4, *s5, *s6, *s7]);
    let mut file = rest.to_vec();
    if mode & 1 != 0 && file.len() >= 60 {
        let crc = crc32fast::hash(&file[..56]);
        file[56..60].copy_from_slice(&crc.to_le_bytes());
    }
    let Ok(h) = Header::decode(&file, size, Path::new("fuzz.snap")) else {
        return;
    };
    assert!(h.mem_off.checked_add(h.mem_len).is_some_and(|e| e <= size));
    assert!(h
        .state_off
        .checked_add(h.state_len)
        .is_some_and(|e| e <= size));
    let (Ok(off), Ok(len)) = (usize::try_from(h.state_off), usize::try_from(h.state_len)) else {
        return;
    };
    if let Some(envelope) = file.get(off..off.saturating_add(len)) {
        if let Ok(st) = persist::decode(envelope) {
            let _ = st.check_shape(&st.shape);
        }
    }
}

vmhop_common::corpus_replay_test!(super::TARGETS, "fuzz/corpus");
