//! The benchmark that `scripts/bench disk` runs: the guest-visible throughput of a data disk on
//! a storaged volume, served three ways, one guest at a time, with the same guest workload:
//! - `vmm`: our VMM's in-process path (`--disk storaged=...`);
//! - `vmm+vhost`: our VMM as the frontend of our `vhost-user-blk` backend;
//! - `qemu+vhost`: QEMU's `vhost-user-blk` device as the frontend of the same backend.
//!
//! The workload is the guest agent's disk writer: 256 KiB of records per O_DIRECT write, each
//! followed by fsync (so a FLUSH), appended from the start of the disk; the write figure is
//! the records it acknowledged over a `WINDOW` (medians of `RUNS` windows). The read figure is
//! the agent's `disk verify`: it reads back every record from the start with 1 MiB O_DIRECT
//! reads. Each guest boots (its root file system read-only from the image, through the same
//! kind of path as its data disk: in-process for `vmm`, a second backend otherwise).

use anyhow::{bail, Context, Result};
use e2e::agent::AgentConn;
use e2e::image::guest_image;
use e2e::qemu::{QemuConfig, QemuGuest};
use e2e::storaged::Storaged;
use e2e::vhost::Backend;
use e2e::vmm::{Disk, VmmConfig, VmmGuest};
use std::path::Path;
use std::time::{Duration, Instant};

/// Agent ready after process start (guest kernel code is emulated on the development machines).
const BOOT: Duration = Duration::from_secs(600);
/// One agent reply.
const REPLY: Duration = Duration::from_secs(300);
/// Bytes of one record of the disk workload.
const RECORD: f64 = agent_proto::RECORD_SIZE as f64;
/// The data volume: large enough that the writer never fills it during the windows.
const VOLUME: &str = "4G";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One variant's figures.
struct Figures {
    /// MiB/s per write window.
    write: Vec<f64>,
    /// MiB/s of the read-back.
    read: f64,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs the workload in a booted guest.
fn measure(agent: &mut AgentConn, runs: usize, window: Duration) -> Result<Figures> {
    agent.command("disk start", REPLY)?;
    let acked = |agent: &mut AgentConn| -> Result<(u64, Instant)> {
        let s = agent.command("disk status", REPLY)?;
        if s.get("state") != Some("running") {
            bail!("disk writer not running: {s:?}");
        }
        Ok((s.num("acked").context("acked")?, Instant::now()))
    };
    // The first window starts once the writer is under way.
    std::thread::sleep(Duration::from_secs(1));
    let (mut n0, mut t0) = acked(agent)?;
    let mut write = Vec::new();
    for _ in 0..runs {
        std::thread::sleep(window);
        let (n1, t1) = acked(agent)?;
        write.push((n1 - n0) as f64 * RECORD / (1 << 20) as f64 / (t1 - t0).as_secs_f64());
        (n0, t0) = (n1, t1);
    }
    let stopped = agent.command("disk stop", REPLY)?;
    let total = stopped.num("acked").context("acked")?;
    let t = Instant::now();
    let v = agent.command("disk verify", REPLY)?;
    let took = t.elapsed().as_secs_f64();
    if v.num("verified") != Some(total) {
        bail!("verify: {v:?} after {total} records");
    }
    Ok(Figures {
        write,
        read: total as f64 * RECORD / (1 << 20) as f64 / took,
    })
}

/// Our backends for a guest: its root file system read-only from the image, its data disk on
/// `volume` of `storaged`.
fn backends(
    dir: &Path,
    rootfs: &Path,
    storaged: &Storaged,
    volume: &str,
) -> Result<(Backend, Backend)> {
    let rootfs = rootfs.to_string_lossy().into_owned();
    let root = Backend::start(dir, "root", &["--file", &rootfs, "--read-only"])?;
    let data = Backend::storaged(dir, "data", storaged, volume, "bench", "primary", &[])?;
    Ok((root, data))
}

fn vmm_variant(
    name: &str,
    storaged: &Storaged,
    dir: &Path,
    vhost: bool,
    runs: usize,
    window: Duration,
) -> Result<Figures> {
    let image = guest_image();
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir)?;
    let volume = format!("data-{name}").replace('+', "-");
    storaged.create_volume(&volume, VOLUME, &[])?;
    let mut running = Vec::new();
    let (root, data) = if vhost {
        let (root, data) = backends(&dir, &image.rootfs, storaged, &volume)?;
        let disks = (
            Disk::vhost_user(&root.socket),
            Disk::vhost_user(&data.socket),
        );
        running.extend([root, data]);
        disks
    } else {
        (
            Disk::File {
                path: image.rootfs.clone(),
                read_only: true,
            },
            Disk::Storaged(format!("{},volume={volume},host=bench", storaged.nbd)),
        )
    };
    let mut guest = VmmGuest::start(&VmmConfig {
        image: &image,
        root: Some(root),
        data_disks: vec![data],
        mem_mib: 256,
        vcpus: 1,
        work_dir: &dir,
    })?;
    guest.agent.wait_ready(BOOT)?;
    measure(&mut guest.agent, runs, window)
}

fn qemu_variant(storaged: &Storaged, dir: &Path, runs: usize, window: Duration) -> Result<Figures> {
    let image = guest_image();
    let dir = dir.join("qemu-vhost");
    std::fs::create_dir_all(&dir)?;
    storaged.create_volume("data-qemu", VOLUME, &[])?;
    let (root, data) = backends(&dir, &image.rootfs, storaged, "data-qemu")?;
    let mut guest = QemuGuest::start(&QemuConfig {
        image: &image,
        data_disks: Vec::new(),
        vhost_user_disks: vec![root.socket.clone(), data.socket.clone()],
        mem_mib: 256,
        vcpus: 1,
        work_dir: &dir,
    })?;
    guest.agent.wait_ready(BOOT)?;
    measure(&mut guest.agent, runs, window)
}

fn main() -> Result<()> {
    let runs = env_or("RUNS", 3usize).max(1);
    let window = Duration::from_secs(env_or("WINDOW", 3u64).max(1));
    let work = tempfile::tempdir()?;
    let dir = work.path();
    std::fs::create_dir_all(dir.join("storaged"))?;
    let storaged = Storaged::start(&dir.join("storaged"))?;
    let mut rows: Vec<(&str, Result<Figures>)> = Vec::new();
    eprintln!("[bench disk] vmm: in-process storaged path");
    rows.push((
        "vmm",
        vmm_variant("vmm", &storaged, dir, false, runs, window),
    ));
    eprintln!("[bench disk] vmm+vhost: our VMM, our vhost-user-blk backend");
    rows.push((
        "vmm+vhost",
        vmm_variant("vmm+vhost", &storaged, dir, true, runs, window),
    ));
    eprintln!("[bench disk] qemu+vhost: QEMU's vhost-user-blk, our backend");
    rows.push(("qemu+vhost", qemu_variant(&storaged, dir, runs, window)));

    println!(
        "guest disk throughput on a storaged volume (256 MiB guest, 1 vCPU); write: 256 KiB \
         O_DIRECT + fsync, median of {runs} windows of {} s; read: 1 MiB O_DIRECT read-back",
        window.as_secs()
    );
    println!(
        "{:<12} {:>14} {:>10} {:>14} {:>10}",
        "path", "write MiB/s", "ratio", "read MiB/s", "ratio"
    );
    let base = match &rows[0].1 {
        Ok(f) => Some((median(&f.write), f.read)),
        Err(_) => None,
    };
    for (name, r) in &rows {
        match r {
            Ok(f) => {
                let (w, rd) = (median(&f.write), f.read);
                let (rw, rr) = base.map_or((f64::NAN, f64::NAN), |(bw, br)| (w / bw, rd / br));
                println!("{name:<12} {w:>14.1} {rw:>10.3} {rd:>14.1} {rr:>10.3}");
            }
            Err(e) => println!("{name:<12} n/a: {e:#}"),
        }
    }
    if std::env::var("KEEP").as_deref() == Ok("1") {
        eprintln!("[bench disk] kept {}", work.keep().display());
    }
    Ok(())
}
