//! The backend binary driven as a frontend drives it, with a guest that misbehaves: a ring
//! whose chains include buffers outside guest memory, a request without a header, one past the
//! end of the disk and a descriptor that loops. The backend answers the good requests, returns
//! the bad ones with nothing or an error status, in ring order, logs every page it wrote into
//! the dirty log, and after a frontend that sends garbage still serves the next one.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 2 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;

/// The backend process, killed on drop.
struct Backend(Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The backend on a 1 MiB disk whose first sector holds 0xcd bytes.
fn start_backend(dir: &Path) -> (Backend, std::path::PathBuf) {
    let disk = dir.join("disk.img");
    let f = File::create(&disk).unwrap();
    f.set_len(1 << 20).unwrap();
    f.write_all_at(&[0xcd; 512], 0).unwrap();
    let socket = dir.join("blk.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
        .arg("--socket")
        .arg(&socket)
        .arg("--file")
        .arg(&disk)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::metadata(&socket).is_ok_and(|m| m.file_type().is_socket()) {
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    (Backend(child), socket)
}

fn desc(mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = GuestAddress(DESC + u64::from(i) * 16);
    mem.write_obj(addr, at).unwrap();
    mem.write_obj(len, at.unchecked_add(8)).unwrap();
    mem.write_obj(flags, at.unchecked_add(12)).unwrap();
    mem.write_obj(next, at.unchecked_add(14)).unwrap();
}

fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    mem.write_obj(kind, GuestAddress(at)).unwrap();
    mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
}

#[test]
fn bad_rings_and_bad_frontends_do_not_stop_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let (mut backend, socket) = start_backend(dir.path());

    // Guest memory in a shared file, as a VMM's memfd.
    let file = Arc::new(tempfile::tempfile().unwrap());
    file.set_len(MEM as u64).unwrap();
    let region = MmapRegionBuilder::new(MEM)
        .with_file_offset(FileOffset::from_arc(file.clone(), 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .build()
        .unwrap();
    let region = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
    let info = VhostUserMemoryRegionInfo::from_guest_region(&region).unwrap();
    let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
    let log = tempfile::tempfile().unwrap();
    log.set_len(4096).unwrap();

    // The chains: a write of sector 8, a read of sector 0 (requests in flight together are
    // not ordered, so they touch different sectors), a header outside memory, no header at
    // all, a read past the end of the disk, a descriptor that points at itself.
    mem.write_slice(&[0xab; 512], GuestAddress(0x11000))
        .unwrap();
    header(&mem, 0x10000, T_OUT, 8);
    desc(&mem, 0, 0x10000, 16, F_NEXT, 1);
    desc(&mem, 1, 0x11000, 512, F_NEXT, 2);
    desc(&mem, 2, 0x12000, 1, F_WRITE, 0);
    header(&mem, 0x10100, T_IN, 0);
    desc(&mem, 3, 0x10100, 16, F_NEXT, 4);
    desc(&mem, 4, 0x13000, 512, F_WRITE | F_NEXT, 5);
    desc(&mem, 5, 0x12001, 1, F_WRITE, 0);
    desc(&mem, 6, 0x7fff_0000_0000, 16, F_NEXT, 2);
    desc(&mem, 7, 0x12003, 1, F_WRITE, 0);
    header(&mem, 0x10200, T_IN, 1 << 20);
    desc(&mem, 8, 0x10200, 16, F_NEXT, 9);
    desc(&mem, 9, 0x14000, 512, F_WRITE | F_NEXT, 11);
    desc(&mem, 11, 0x12004, 1, F_WRITE, 0);
    desc(&mem, 10, 0x10300, 16, F_NEXT, 10);
    let heads = [0u16, 3, 6, 7, 8, 10];
    for (i, h) in heads.iter().enumerate() {
        mem.write_obj(*h, GuestAddress(AVAIL + 4 + 2 * i as u64))
            .unwrap();
    }
    mem.write_obj(heads.len() as u16, GuestAddress(AVAIL + 2))
        .unwrap();

    let mut fe = Frontend::connect(&socket, 1).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    let protocol = fe.get_protocol_features().unwrap();
    assert!(
        protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD | VhostUserProtocolFeatures::CONFIG)
    );
    fe.set_protocol_features(protocol).unwrap();
    let version_1 = 1u64 << 32;
    fe.set_features(
        version_1
            | (features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            | VhostUserVirtioFeatures::LOG_ALL.bits(),
    )
    .unwrap();
    fe.set_mem_table(&[info]).unwrap();
    fe.set_log_base(
        0,
        Some(VhostUserDirtyLogRegion {
            mmap_size: 4096,
            mmap_offset: 0,
            mmap_handle: std::os::fd::AsRawFd::as_raw_fd(&log),
        }),
    )
    .unwrap();
    let hva = |gpa: u64| info.userspace_addr + gpa;
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: hva(DESC),
            used_ring_addr: hva(USED),
            avail_ring_addr: hva(AVAIL),
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_base(0, 0).unwrap();
    let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    kick.write(1).unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    while mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() < heads.len() as u16 {
        assert!(
            Instant::now() < deadline,
            "the backend did not return every chain"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // In ring order, each with its length: status byte (+ data for the read); nothing for
    // the chains that are not requests.
    let used: Vec<(u32, u32)> = (0..heads.len() as u64)
        .map(|i| {
            let at = GuestAddress(USED + 4 + 8 * i);
            (
                mem.read_obj(at).unwrap(),
                mem.read_obj(at.unchecked_add(4)).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        used,
        vec![(0, 1), (3, 513), (6, 0), (7, 0), (8, 1), (10, 0)]
    );
    let status = |at: u64| mem.read_obj::<u8>(GuestAddress(at)).unwrap();
    assert_eq!(
        (status(0x12000), status(0x12001), status(0x12004)),
        (0, 0, 1)
    );
    let mut back = [0u8; 512];
    mem.read_slice(&mut back, GuestAddress(0x13000)).unwrap();
    assert_eq!(back, [0xcd; 512]);
    std::fs::File::open(dir.path().join("disk.img"))
        .unwrap()
        .read_exact_at(&mut back, 8 * 512)
        .unwrap();
    assert_eq!(back, [0xab; 512]);
    // Every page the backend wrote is in the dirty log: the status bytes, the read data and
    // the used ring (page p is bit p % 8 of byte p / 8).
    let mut bits = [0u8; 4];
    log.read_exact_at(&mut bits, 0).unwrap();
    for page in [0x2u64, 0x12, 0x13] {
        assert_ne!(
            bits[(page / 8) as usize] & (1 << (page % 8)),
            0,
            "page {page:#x}"
        );
    }
    drop(fe);

    // A frontend that sends garbage, then one that hangs up mid-message: the next one is
    // served.
    let mut junk = UnixStream::connect(&socket).unwrap();
    let _ = junk.write_all(&[0xff; 64]);
    drop(junk);
    let mut half = UnixStream::connect(&socket).unwrap();
    let _ = half.write_all(&[1, 0, 0, 0, 1, 0, 0, 0]);
    drop(half);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        backend.0.try_wait().unwrap().is_none(),
        "the backend exited"
    );
    let fe = Frontend::connect(&socket, 1).unwrap();
    fe.set_owner().unwrap();
    assert_eq!(fe.get_features().unwrap(), features);
}
