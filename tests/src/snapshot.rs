//! One booted guest for the whole suite: the first test that asks boots the test guest under
//! our VMM once, waits for its agent, and saves a snapshot; every later test restores that
//! snapshot into its own VMM process in a fraction of a second instead of booting for 30-60 s.
//!
//! The snapshot's VM has [`MEM_MIB`] of memory, one vCPU, the image's root file system
//! (read-only) as vda and a fresh, zeroed [`DATA_DISK_BYTES`] data disk as vdb that the guest
//! has not touched. A test restores it with the same shape: its own root (the image file or a
//! volume with the same content) and its own fresh data disk of that size (file or volume).
//! The cache lives beside the built binaries and is keyed by the VMM binary, the kernel, the
//! root file system and the command line; one process builds it at a time (a file lock).

use crate::image::GuestImage;
use crate::vmm::{VmmConfig, VmmGuest};
use anyhow::{bail, Context, Result};
use std::hash::{Hash, Hasher};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Guest memory of the snapshot.
pub const MEM_MIB: u32 = 128;
/// Size of the data disk the snapshot's guest saw.
pub const DATA_DISK_BYTES: u64 = 64 << 20;
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// A saved booted guest.
#[derive(Debug, Clone)]
pub struct Booted {
    /// The snapshot file.
    pub path: PathBuf,
    /// The guest's boot id (every restored guest has it).
    pub boot_id: String,
}

fn key(image: &GuestImage) -> Result<String> {
    let vmm = crate::binary("vmm");
    let meta = std::fs::metadata(&vmm).with_context(|| format!("stat {}", vmm.display()))?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        meta.len(),
        meta.modified()?,
        &image.kernel,
        &image.rootfs,
        &image.cmdline,
        MEM_MIB,
        DATA_DISK_BYTES,
    )
        .hash(&mut h);
    Ok(format!("{:016x}", h.finish()))
}

/// The suite's booted guest, booting and saving it first if needed.
pub fn booted(image: &GuestImage) -> Result<Booted> {
    let vmm = crate::binary("vmm");
    let root = vmm
        .parent()
        .context("vmm binary has no directory")?
        .join("e2e-snapshots");
    std::fs::create_dir_all(&root)?;
    let lock = std::fs::File::create(root.join("lock"))?;
    // SAFETY: flock on a descriptor owned by `lock`, held until it is dropped.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("lock {}", root.display());
    }
    let dir = root.join(key(image)?);
    let (path, id_file) = (dir.join("guest.snap"), dir.join("boot_id"));
    if let (true, Ok(boot_id)) = (path.exists(), std::fs::read_to_string(&id_file)) {
        return Ok(Booted { path, boot_id });
    }
    // Snapshots of earlier builds are of no further use.
    for old in std::fs::read_dir(&root)?.flatten() {
        if old.path().is_dir() {
            let _ = std::fs::remove_dir_all(old.path());
        }
    }
    std::fs::create_dir_all(&dir)?;
    let t = Instant::now();
    let boot_id = make(image, &dir, &path)?;
    std::fs::write(&id_file, &boot_id)?;
    eprintln!(
        "booted and saved the suite's guest in {} s ({})",
        t.elapsed().as_secs(),
        path.display()
    );
    Ok(Booted { path, boot_id })
}

fn make(image: &GuestImage, dir: &Path, path: &Path) -> Result<String> {
    let mut guest = VmmGuest::start(&vm_config(image, dir))?;
    let ready = guest.agent.wait_ready(BOOT_TIMEOUT)?;
    let boot_id = ready.get("boot_id").context("no boot id")?.to_string();
    let (code, body) = guest.api("POST", "/v1/vm/pause")?;
    if code != 200 {
        bail!("pause: {code} {body}");
    }
    let (code, body) = guest.api_json(
        "POST",
        "/v1/vm/snapshot",
        &format!(r#"{{"path":"{}"}}"#, path.display()),
    )?;
    if code != 200 {
        bail!("snapshot: {code} {body}");
    }
    let _ = guest.api("POST", "/v1/vm/shutdown");
    guest.wait_exit(Duration::from_secs(30))?;
    std::fs::remove_file(dir.join("data.img"))?;
    Ok(boot_id)
}

/// A VM of the snapshot's shape with its own fresh data disk (`data.img`) in `dir`, which is
/// created: what boots the guest to save it, and what [`VmmGuest::restore`] or an incoming
/// migration of a restored guest takes.
pub fn vm_config<'a>(image: &'a GuestImage, dir: &'a Path) -> VmmConfig<'a> {
    std::fs::create_dir_all(dir).unwrap();
    let data = crate::workload::fresh_disk(&dir.join("data.img"), DATA_DISK_BYTES);
    vm_config_with(
        image,
        dir,
        crate::vmm::Disk::File {
            path: data,
            read_only: false,
        },
    )
}

/// A VM of the snapshot's shape whose one data disk is `data`, working in `dir` (created): what
/// [`VmmGuest::restore`] takes when the disk is a volume or a vhost-user backend.
pub fn vm_config_with<'a>(
    image: &'a GuestImage,
    dir: &'a Path,
    data: crate::vmm::Disk,
) -> VmmConfig<'a> {
    std::fs::create_dir_all(dir).unwrap();
    VmmConfig {
        image,
        root: None,
        data_disks: vec![data],
        mem_mib: MEM_MIB,
        vcpus: 1,
        work_dir: dir,
    }
}

impl VmmGuest {
    /// Restores the suite's booted guest (see [`booted`]) with the disks of `cfg`, which must
    /// have the snapshot's shape: [`MEM_MIB`], one vCPU, one data disk of [`DATA_DISK_BYTES`].
    pub fn restore(cfg: &VmmConfig, booted: &Booted) -> Result<VmmGuest> {
        if cfg.mem_mib != MEM_MIB || cfg.vcpus != 1 || cfg.data_disks.len() != 1 {
            bail!("the suite's snapshot has {MEM_MIB} MiB, one vCPU and one data disk");
        }
        let path = booted.path.to_str().context("snapshot path")?;
        Self::start_with(cfg, &["--restore", path])
    }
}
