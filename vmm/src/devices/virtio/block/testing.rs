//! What the block device's unit tests share: a disk file, a driver's side of the queue (a
//! mock split ring in guest memory) with read requests in it, and a wait for the device's
//! interrupts.

use crate::memory::GuestMem;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_disk::{Backend, Disk, FileBackend};
use vmm_sys_util::eventfd::EventFd;

/// How long a test waits for something that happens at once or never: it fails instead of
/// hanging when the device stopped serving.
const HANG: Duration = Duration::from_secs(120);

/// A disk of `mib` MiB of zeroes in `dir`.
pub fn disk(dir: &std::path::Path, mib: u64) -> Disk {
    let path = dir.join("d.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    Disk::new(
        Backend::File(FileBackend::open(&path, false).unwrap()),
        false,
        "t",
    )
}

/// Adds `n` chains to `ring` from descriptor `3 * first` on, each a read of `len` bytes at
/// sector 0 into the same buffer at 16 MiB; chain `i`'s status byte is at
/// `0x20_0000 + i` (set to 0xff until the device writes it).
pub fn reads(ring: &MockSplitQueue<GuestMem>, mem: &GuestMem, first: u16, n: u16, len: u32) {
    let mut descs = Vec::new();
    for i in first..first + n {
        let header = 0x10_0000 + 16 * u64::from(i);
        mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(header))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x20_0000 + u64::from(i)))
            .unwrap();
        let next = (3 * i + 1, 3 * i + 2);
        descs.push(SplitDescriptor::new(
            header,
            16,
            VRING_DESC_F_NEXT as u16,
            next.0,
        ));
        let w = (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16;
        descs.push(SplitDescriptor::new(0x100_0000, len, w, next.1));
        let status = 0x20_0000 + u64::from(i);
        descs.push(SplitDescriptor::new(
            status,
            1,
            VRING_DESC_F_WRITE as u16,
            0,
        ));
    }
    let raw: Vec<RawDescriptor> = descs.into_iter().map(RawDescriptor::from).collect();
    ring.add_desc_chains(&raw, 3 * first).unwrap();
}

/// The status bytes of the first `n` chains [`reads`] added.
pub fn statuses(mem: &GuestMem, n: u64) -> Vec<u8> {
    (0..n)
        .map(|i| mem.read_obj(GuestAddress(0x20_0000 + i)).unwrap())
        .collect()
}

/// Waits, interrupt by interrupt on `irq`, until the device has used `n` chains of `ring`.
/// Panics if the device stops interrupting before.
pub fn wait_used(irq: &EventFd, ring: &MockSplitQueue<GuestMem>, n: u16) {
    let deadline = Instant::now() + HANG;
    while ring.used().idx().load() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{} of {n} chains used, and no interrupt",
            ring.used().idx().load()
        );
        let mut fd = libc::pollfd {
            fd: irq.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        unsafe { libc::poll(&mut fd, 1, left.as_millis() as libc::c_int) };
        let _ = irq.read();
    }
}

/// Runs `f` while another thread drives `rt` (a current-thread runtime, as the tests build
/// theirs: its tasks run only while someone drives it), as the VMM's runtime threads do.
pub fn driving<R>(rt: &tokio::runtime::Runtime, f: impl FnOnce() -> R) -> R {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::scope(|s| {
        s.spawn(|| rt.block_on(stopped));
        // Dropped on return or panic alike, which ends the driving thread.
        let _stop = stop;
        f()
    })
}
