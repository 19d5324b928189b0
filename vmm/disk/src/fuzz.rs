//! Entry point for the fuzzer: a driver's ring, every byte of it from the input, through what
//! the data path does with it (take chains within the intake's bounds, parse each, check and
//! prepare its request, complete it into guest memory and return it), checking what must hold
//! for any ring: nothing past the advertised limits is taken, nothing outside the disk is
//! prepared. The cargo-fuzz target in `vmm/fuzz` calls it, and so does this crate's test
//! suite for every file of its checked-in corpus (`vmm/fuzz/corpus/descriptor_chains/`), on
//! the stable toolchain.
//!
//! Input: a control byte (queue size `2 << min(c & 7, 5)`, up to 64 so that a ring of
//! chains as long as the ring costs little; bit 3: EVENT_IDX), the device's next
//! available index (u16), then the first 32 KiB of guest memory, which holds the descriptor
//! table at 0, the available ring at [`AVAIL`] and the used ring at [`USED`]. Guest memory has
//! a second 32 KiB region at [`HIGH`], after a hole.

use crate::exec::{complete, Completion, Job};
use crate::intake::{Intake, Stopped, MAX_IN_FLIGHT_BYTES};
use crate::offer::{MAX_RANGE_SECTORS, MAX_RANGE_SEGMENTS, SECTOR_SIZE};
use crate::request::{MAX_DESCRIPTORS, MAX_REQUEST_BYTES};
use crate::{Backend, Disk, FileBackend};
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// The fuzz targets by name, for the corpus regression test.
pub const TARGETS: [(&str, Target); 1] = [("descriptor_chains", descriptor_chains)];

/// Guest memory regions, 32 KiB each.
const REGION: usize = 32 << 10;
/// Where the available ring is.
pub const AVAIL: u64 = 0x1000;
/// Where the used ring is.
pub const USED: u64 = 0x2000;
/// Where the second memory region starts.
pub const HIGH: u64 = 0x10_0000;
/// Turns of the intake per input (each takes at most a ring).
const TURNS: usize = 2;

type Mem = GuestMemoryMmap<AtomicBitmap>;

/// The disk's size: small, so that what a request may read or write stays cheap to fake.
const DISK_BYTES: u64 = 16 << 10;

/// A disk of zeroes in a memfd (requests are only prepared, never run).
fn disk() -> &'static Disk {
    static DISK: OnceLock<Disk> = OnceLock::new();
    DISK.get_or_init(|| {
        let fd = nix::sys::memfd::memfd_create(c"fuzz-disk", nix::sys::memfd::MFdFlags::empty())
            .expect("memfd");
        let file = std::fs::File::from(fd);
        file.set_len(DISK_BYTES).expect("size the memfd");
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let backend = FileBackend::open(std::path::Path::new(&path), false).expect("open");
        Disk::new(Backend::File(backend), false, "fuzz")
    })
}

thread_local! {
    static MEM: Mem = Mem::from_ranges(&[(GuestAddress(0), REGION), (GuestAddress(HIGH), REGION)])
        .expect("guest memory");
}

/// One driver's ring through the data path; see the module's docs for the input.
pub fn descriptor_chains(data: &[u8]) {
    let [ctl, a, b, rest @ ..] = data else {
        return;
    };
    MEM.with(|mem| {
        let zero = vec![0u8; REGION];
        mem.write_slice(&zero, GuestAddress(0)).expect("low region");
        mem.write_slice(&zero, GuestAddress(HIGH))
            .expect("high region");
        let n = rest.len().min(REGION);
        mem.write_slice(&rest[..n], GuestAddress(0))
            .expect("low region");
        run(mem, *ctl, u16::from_le_bytes([*a, *b]));
    });
}

fn run(mem: &Mem, ctl: u8, next_avail: u16) {
    let size = 2u16 << (ctl & 7).min(5);
    let Ok(mut queue) = Queue::new(256) else {
        return;
    };
    queue.set_size(size);
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_event_idx(ctl & 8 != 0);
    queue.set_next_avail(next_avail);
    queue.set_ready(true);
    let disk = disk();
    let mut intake = Intake::new();
    for _ in 0..TURNS {
        let popped = intake.pop(&mut queue, mem);
        assert!(
            popped.len() <= usize::from(size),
            "more than a ring in one turn"
        );
        assert!(intake.requests() <= u32::from(size));
        assert!(intake.requests() <= 1 || intake.bytes() <= MAX_IN_FLIGHT_BYTES);
        for (head, parsed) in popped {
            let Ok(req) = parsed else {
                let _ = queue.add_used(mem, head, 0);
                continue;
            };
            assert!(req.data_in.len() + req.data_out.len() <= MAX_DESCRIPTORS);
            assert!(req.data_len() <= 2 * MAX_REQUEST_BYTES + 16);
            let done = serve(disk, &disk.prepare(&req, mem));
            let len = complete(mem, &req, &done);
            let _ = queue.add_used(mem, req.head, len);
            intake.finish(&req);
        }
        let _ = queue.needs_notification(mem);
        if !matches!(intake.stopped(), Stopped::Turn | Stopped::Full) {
            break;
        }
    }
}

/// What the backend would answer to `job`, after checking that it stays on the disk.
fn serve(disk: &Disk, job: &Job) -> Completion {
    let on_disk = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|e| e <= disk.size());
    let ok = |data: Vec<u8>| Completion { status: 0, data };
    match job {
        Job::Done(c) => c.clone(),
        Job::Read { offset, len } => {
            assert!(on_disk(*offset, *len as u64));
            ok(vec![0x5a; *len])
        }
        Job::Write { offset, data } => {
            assert!(on_disk(*offset, data.len() as u64));
            ok(Vec::new())
        }
        Job::Flush => ok(Vec::new()),
        Job::Ranges { ranges, .. } => {
            assert!(ranges.len() <= MAX_RANGE_SEGMENTS as usize);
            for &(offset, len) in ranges {
                assert!(len <= u64::from(MAX_RANGE_SECTORS) * SECTOR_SIZE);
                assert!(on_disk(offset, len));
            }
            ok(Vec::new())
        }
    }
}

vmhop_common::corpus_replay_test!(super::TARGETS, "../fuzz/corpus");
