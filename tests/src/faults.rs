//! The crash-point fault matrix: one live migration of the suite's guest from host a to host
//! b per cell, on the namespaced two-host rig, with one failure injected at one instant, then
//! the verdict.
//!
//! Failures: storaged killed at each step of the flip and right after it was done but before
//! it answered (fault points, see `vmhop_common::faults`; started again as systemd would);
//! either host's migrated killed right after it recorded each phase (started again); either
//! VMM killed during pre-copy or while the source waits on the flip (not started again: a VMM
//! is the guest); the flip's answer lost on its way to the destination (which flips); the
//! network cut during the flip between the source and storage, the source and the destination,
//! or both.
//!
//! Each cell runs the guest's memory and disk workloads, samples every VMM of the guest
//! throughout (two running at once is a split brain), lets the cluster settle, then judges:
//! where the guest runs (exactly one host, holding the primary lease on its volume, the same
//! boot, its memory pattern intact, every acknowledged disk record verifying) or why it is
//! stopped, in words an operator can act on. A stopped guest passes only where the failure
//! destroyed its only copy (its VMM killed before the destination held its state).

use crate::agent::AgentConn;
use crate::image::GuestImage;
use crate::migrated::{agent_of, vmm_processes_with, write_restored_guest_toml, Migration};
use crate::process::wait_for;
use crate::two_hosts::{TwoHosts, AGENT_PORT};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The guest's data volume.
pub const VOLUME: &str = "vm1-data";
const REPLY: Duration = Duration::from_secs(120);
const PHASE: Duration = Duration::from_secs(120);
/// How long the cluster may take to settle after the failure (the source's storaged calls
/// give up after 60 s).
const SETTLE: Duration = Duration::from_secs(150);
/// The memory workload's size.
const MIB: usize = 8;
/// Peer loss timeout of the rig's agents.
const PEER_TIMEOUT_MS: u64 = 3000;

/// Which host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// a, where the guest starts.
    Source,
    /// b, where it goes.
    Destination,
}

impl Side {
    fn host(self) -> &'static str {
        match self {
            Side::Source => "a",
            Side::Destination => "b",
        }
    }
}

/// When a failure without a fault point strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// During pre-copy (the stream slowed to a crawl).
    Precopy,
    /// While the source waits on the flip (storaged frozen).
    Flip,
}

/// Which link a cut severs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// The source host from the storage host.
    SourceStorage,
    /// The source host from the destination host.
    SourceDestination,
    /// Both.
    Both,
}

/// One failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// storaged killed at a fault point of the flip, then started again.
    Storaged(&'static str),
    /// A host's migrated killed right after it recorded a phase (`source.PHASE`,
    /// `destination.PHASE`), then started again.
    Agent(&'static str),
    /// A host's VMM killed.
    Vmm(Side, Window),
    /// storaged flips, but its answer never reaches the destination (which asked for it).
    FlipAnswerLost,
    /// A network cut while the source waits on the flip, healed once the cluster settled.
    Cut(Link),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Storaged(p) => write!(f, "kill storaged at {p}"),
            Fault::Agent(p) => write!(f, "kill migrated at {p}"),
            Fault::Vmm(s, w) => write!(f, "kill the {} VMM during {w:?}", s.host()),
            Fault::FlipAnswerLost => write!(f, "flip answer lost"),
            Fault::Cut(l) => write!(f, "cut {l:?} at the flip"),
        }
    }
}

/// Every cell of the matrix.
pub fn all_cells() -> Vec<Fault> {
    let mut cells: Vec<Fault> = [
        "flip.barrier",
        "flip.drain",
        "flip.disconnect",
        "flip.persist",
        "flip.promote",
        "flip.acknowledge",
    ]
    .into_iter()
    .map(Fault::Storaged)
    .collect();
    cells.extend(
        [
            "source.preparing",
            "source.precopy",
            "source.handed-over",
            "source.flipping",
            "source.flipped",
            "source.resuming",
            "source.cleanup",
            "destination.precopy",
            "destination.resuming",
            "destination.completed",
        ]
        .into_iter()
        .map(Fault::Agent),
    );
    for side in [Side::Source, Side::Destination] {
        for w in [Window::Precopy, Window::Flip] {
            cells.push(Fault::Vmm(side, w));
        }
    }
    cells.push(Fault::FlipAnswerLost);
    for l in [Link::SourceStorage, Link::SourceDestination, Link::Both] {
        cells.push(Fault::Cut(l));
    }
    cells
}

/// A representative subset for the test suite: a crash of storaged mid-flip, of the source
/// agent past the point of no return, of the destination VMM before the flip and after it
/// (the source takes the volumes back), and a cut of the source.
pub fn ci_cells() -> Vec<Fault> {
    vec![
        Fault::Storaged("flip.persist"),
        Fault::Agent("source.flipped"),
        Fault::Vmm(Side::Destination, Window::Precopy),
        Fault::Vmm(Side::Destination, Window::Flip),
        Fault::Cut(Link::SourceStorage),
    ]
}

/// What a cell ended with.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    /// The host the guest runs on, if any.
    pub runs_on: Option<String>,
    /// The source's migration record: phase and error.
    pub migration: String,
    /// Disk records acknowledged to the guest and verified afterwards.
    pub records: u64,
    /// Samples in which two VMMs of the guest were running at once.
    pub split_brain: u32,
    /// Why the guest is stopped, or what else went wrong.
    pub note: String,
    /// The verdict.
    pub pass: bool,
    /// How long the cell took.
    pub secs: f64,
}

/// Watches the guest's VMMs: counts the samples in which two of them were running.
struct Watcher {
    stop: Arc<AtomicBool>,
    split: Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn start(root: String) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let split = Arc::new(AtomicU32::new(0));
        let (s, c) = (stop.clone(), split.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let running = vmm_processes_with(&root)
                    .into_iter()
                    .filter(|&pid| vmm_running(pid))
                    .count();
                if running > 1 {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Watcher {
            stop,
            split,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u32 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.split.load(Ordering::Relaxed)
    }
}

/// Whether the VMM `pid` reports its vCPUs running (its API socket is `api.sock` in its work
/// directory, the process's current directory).
fn vmm_running(pid: u32) -> bool {
    let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) else {
        return false;
    };
    let Ok((200, body)) = crate::vmm::api_call(&cwd.join("api.sock"), "GET", "/v1/vm") else {
        return false;
    };
    body.contains("\"running\"")
}

/// Runs one cell under `dir` with the suite's guest `image`.
pub fn run_cell(fault: Fault, image: &GuestImage, dir: &Path) -> Verdict {
    let start = Instant::now();
    let mut v = match cell(fault, image, dir) {
        Ok(v) => v,
        Err(e) => Verdict {
            note: format!("{e:#}"),
            ..Verdict::default()
        },
    };
    v.secs = start.elapsed().as_secs_f64();
    v
}

fn cell(fault: Fault, image: &GuestImage, dir: &Path) -> Result<Verdict> {
    let mut h = TwoHosts::start(dir, &[VOLUME], PEER_TIMEOUT_MS)?;
    // The process a fault point lives in starts armed before the guest does (restarting it
    // later would be a failure of its own).
    arm(&mut h, fault)?;
    let booted = crate::snapshot::booted(image)?;
    let toml = dir.join("vm1.toml");
    write_restored_guest_toml(&toml, "vm1", image, &booted, VOLUME)?;
    let rec = h.a.ctl(&["run", toml.to_str().context("path")?])?;
    let mut agent = agent_of(&rec, &dir.join("serial-a.log"))?;
    agent.command(&format!("mem start {MIB}"), REPLY)?;
    agent.command("disk start", REPLY)?;
    // The writer has records on the volume before anything fails.
    wait_for("the guest's first disk records", PHASE, || {
        let s = agent.command("disk status", REPLY).ok()?;
        (s.num("acked")? >= 64).then_some(())
    })?;
    let root =
        h.a.work_dir
            .parent()
            .context("rig dir")?
            .display()
            .to_string();
    let watcher = Watcher::start(root.clone());

    let windowed = matches!(
        fault,
        Fault::Vmm(..) | Fault::FlipAnswerLost | Fault::Cut(_)
    );
    let flip_window = matches!(
        fault,
        Fault::Vmm(_, Window::Flip) | Fault::FlipAnswerLost | Fault::Cut(_)
    );
    // A frozen storaged holds every disk request of the source's hand-over: the writer pauses
    // for those cells (its acknowledged records are verified all the same).
    let mut stopped_acked = None;
    if flip_window {
        let d = agent.command("disk stop", REPLY)?;
        stopped_acked = Some(d.num("acked").context("acked")?);
    }
    if windowed {
        slow_stream(&h)?;
    }
    let m = Migration::start(&h.a, &["vm1", "--to", "b"])?;
    let mut heal: Option<Link> = None;
    match fault {
        Fault::Storaged(_) => {
            // It dies at its point; as under systemd, it is back a moment later.
            wait_for("storaged to reach its fault point", PHASE, || {
                h.storaged.exited().then_some(())
            })?;
            std::thread::sleep(Duration::from_millis(500));
            h.storaged.spawn(&[])?;
        }
        Fault::Agent(point) => {
            let a = if point.starts_with("source") {
                &mut h.a
            } else {
                &mut h.b
            };
            wait_for("migrated to reach its fault point", PHASE, || {
                (!a.is_running()).then_some(())
            })?;
            a.opts.env.clear();
            std::thread::sleep(Duration::from_millis(500));
            a.start_again()?;
        }
        Fault::Vmm(side, window) => {
            in_window(&h, window)?;
            let pids = h.agent(side.host()).vmm_pids();
            for pid in pids {
                // SAFETY: kill(2) on a pid just read from the agent's pid file and checked
                // to be a live vmm process.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
            leave_window(&h, window)?;
        }
        Fault::FlipAnswerLost => {
            // storaged stops itself once the flip is done, before it answers; the link of the
            // destination (which flips) to it is cut, storaged goes on, its answer is lost.
            // The link heals once the destination gave the answer up and reads the leases.
            unshape(&h)?;
            wait_for("storaged to stop at flip.acknowledge", PHASE, || {
                h.storaged
                    .pid()
                    .filter(|&p| crate::process::stopped(p))
                    .map(|_| ())
            })?;
            let (b, s) = (h.rig.host("b"), h.rig.host("storage"));
            b.cut(s)?;
            h.storaged.signal(libc::SIGCONT)?;
            wait_for("the destination to read the leases back", PHASE, || {
                let ms = h.b.migrations().ok()?;
                let noted = ms.iter().any(|m| {
                    m["steps"].as_array().is_some_and(|st| {
                        st.iter().any(|x| {
                            x["note"]
                                .as_str()
                                .is_some_and(|n| n.contains("reading the leases back"))
                        })
                    })
                });
                noted.then_some(())
            })?;
            b.heal(s)?;
        }
        Fault::Cut(link) => {
            in_window(&h, Window::Flip)?;
            cut(&h, link, true)?;
            h.storaged.signal(libc::SIGCONT)?;
            heal = Some(link);
        }
    }
    unshape(&h)?;
    let settled = match heal {
        None => settle(&h, &["a", "b"]),
        Some(link) => {
            // The destination settles while the source is cut off (it learns the outcome
            // once it reaches storaged and its peer again).
            let b = settle(&h, &["b"]);
            cut(&h, link, false)?;
            b.and(settle(&h, &["a", "b"]))
        }
    };
    drop(m);
    let split_brain = watcher.finish();
    drop(agent);
    let mut v = judge(&h, dir, &booted.boot_id, fault, stopped_acked)?;
    v.split_brain = split_brain;
    if let Err(e) = settled {
        v.note = format!("{e:#}; {}", v.note);
        v.pass = false;
    }
    if split_brain > 0 {
        v.pass = false;
        v.note = format!(
            "SPLIT BRAIN: two VMMs ran the guest in {split_brain} samples; {}",
            v.note
        );
    }
    Ok(v)
}

/// Starts the process a fault point lives in with that point armed.
fn arm(h: &mut TwoHosts, fault: Fault) -> Result<()> {
    match fault {
        Fault::Storaged(point) => {
            h.storaged.kill9();
            h.storaged
                .spawn(&[(vmhop_common::faults::CRASH_AT, point)])?;
        }
        Fault::FlipAnswerLost => {
            h.storaged.kill9();
            h.storaged
                .spawn(&[(vmhop_common::faults::STALL_AT, "flip.acknowledge")])?;
        }
        Fault::Agent(point) => {
            let a = if point.starts_with("source") {
                &mut h.a
            } else {
                &mut h.b
            };
            a.opts.env = vec![(vmhop_common::faults::CRASH_AT.into(), point.into())];
            a.restart()?;
        }
        Fault::Vmm(..) | Fault::Cut(_) => {}
    }
    Ok(())
}

/// The migration stream from a to b crawls (the agents' REST calls do not).
fn slow_stream(h: &TwoHosts) -> Result<()> {
    h.rig
        .host("a")
        .shape(h.rig.host("b").addr, Some(AGENT_PORT), "1mbit")
}

fn unshape(h: &TwoHosts) -> Result<()> {
    h.rig.host("a").unshape()
}

/// Waits until the migration is in `window`: pre-copy (the stream crawling), or the source
/// waiting on the flip (storaged frozen, the stream let go).
fn in_window(h: &TwoHosts, window: Window) -> Result<()> {
    h.a.wait_migration_phase("vm1", "precopy", PHASE)?;
    if window == Window::Flip {
        h.storaged.signal(libc::SIGSTOP)?;
        unshape(h)?;
        h.a.wait_migration_phase("vm1", "flipping", PHASE)?;
    }
    Ok(())
}

fn leave_window(h: &TwoHosts, window: Window) -> Result<()> {
    if window == Window::Flip {
        h.storaged.signal(libc::SIGCONT)?;
    }
    Ok(())
}

/// Cuts (`on`) or heals `link`.
fn cut(h: &TwoHosts, link: Link, on: bool) -> Result<()> {
    let (a, b, s) = (h.rig.host("a"), h.rig.host("b"), h.rig.host("storage"));
    let pairs: &[(_, _)] = match link {
        Link::SourceStorage => &[(a, s)],
        Link::SourceDestination => &[(a, b)],
        Link::Both => &[(a, s), (a, b)],
    };
    for (x, y) in pairs {
        if on {
            x.cut(y)?;
        } else {
            x.heal(y)?;
        }
    }
    Ok(())
}

/// Waits until none of `hosts`' agents has a migration of vm1 in progress.
fn settle(h: &TwoHosts, hosts: &[&str]) -> Result<()> {
    let what = format!("the migration to end on {}", hosts.join(" and "));
    wait_for(&what, SETTLE, || {
        let open = |side: &str| {
            h.agent(side)
                .migrations()
                .map(|ms| {
                    ms.iter().any(|m| {
                        !matches!(
                            m["phase"].as_str(),
                            Some("completed" | "aborted" | "failed")
                        )
                    })
                })
                .unwrap_or(true)
        };
        hosts.iter().all(|h| !open(h)).then_some(())
    })
}

/// The verdict once things settled.
fn judge(
    h: &TwoHosts,
    dir: &Path,
    boot_id: &str,
    fault: Fault,
    stopped_acked: Option<u64>,
) -> Result<Verdict> {
    let mut v = Verdict::default();
    let src = h.a.migrations().unwrap_or_default();
    if let Some(m) = src.last() {
        v.migration = match m["error"].as_str() {
            Some(e) => format!("{}: {e}", m["phase"].as_str().unwrap_or("?")),
            None => m["phase"].as_str().unwrap_or("?").to_string(),
        };
    }
    let running: Vec<&str> = ["a", "b"]
        .into_iter()
        .filter(|host| {
            h.agent(host)
                .instance("vm1")
                .is_ok_and(|r| r["state"] == "running")
                && !h.agent(host).vmm_pids().is_empty()
        })
        .collect();
    match running.as_slice() {
        [host] => {
            v.runs_on = Some(host.to_string());
            let leases = h.storaged.leases(VOLUME)?;
            if leases != vec![(host.to_string(), "primary".to_string())] {
                v.note = format!("the guest runs on {host} but the leases are {leases:?}");
                return Ok(v);
            }
            let rec = h.agent(host).instance("vm1")?;
            let mut agent = agent_of(&rec, &dir.join(format!("serial-{host}-end.log")))?;
            match healthy(&mut agent, boot_id, stopped_acked) {
                Ok(records) => {
                    v.records = records;
                    v.pass = true;
                }
                Err(e) => v.note = format!("the guest on {host} is not healthy: {e:#}"),
            }
        }
        [] => {
            let why = ["a", "b"]
                .iter()
                .filter_map(|host| {
                    let r = h.agent(host).instance("vm1").ok()?;
                    Some(format!(
                        "{host}: {} ({})",
                        r["state"].as_str().unwrap_or("?"),
                        r["exit"].as_str().unwrap_or("")
                    ))
                })
                .collect::<Vec<_>>()
                .join("; ");
            v.note = format!("the guest is stopped: {why}");
            // Its only copy was lost: the source VMM killed before the destination held the
            // whole state. Start it again from its volume.
            v.pass = fault == Fault::Vmm(Side::Source, Window::Precopy);
        }
        _ => v.note = format!("instances running on {running:?}"),
    }
    Ok(v)
}

/// The same boot, the memory pattern intact, the disk records the guest was acknowledged all
/// verifying (`stopped_acked`: the writer was stopped before the migration with that many);
/// returns how many.
fn healthy(agent: &mut AgentConn, boot_id: &str, stopped_acked: Option<u64>) -> Result<u64> {
    let clock = agent.command("clock", REPLY)?;
    if clock.get("boot_id") != Some(boot_id) {
        bail!("the guest rebooted: {clock:?}");
    }
    let m = agent.command("mem status", REPLY)?;
    if m.num("errors") != Some(0)
        || m.num("checksum")
            != Some(agent_proto::expected_checksum(
                MIB,
                &m.nums("seqs").context("seqs")?,
            ))
    {
        bail!("memory pattern broken: {m:?}");
    }
    let acked = match stopped_acked {
        Some(n) => n,
        None => {
            let s = agent.command("disk status", REPLY)?;
            if s.get("state") == Some("failed") {
                bail!("the guest's disk writer failed (an I/O error): {s:?}");
            }
            agent
                .command("disk stop", REPLY)?
                .num("acked")
                .context("acked")?
        }
    };
    let verified = agent.command("disk verify", REPLY)?;
    if verified.num("verified") != Some(acked) || verified.num("boot_ids") != Some(1) {
        bail!("disk records: {acked} acknowledged, {verified:?}");
    }
    Ok(acked)
}

/// The matrix as a table.
pub fn table(rows: &[(Fault, Verdict)]) -> String {
    let mut out = format!(
        "{:<42} {:<5} {:<8} {:>7} {:>6}  {}\n",
        "failure", "ok", "guest", "records", "secs", "migration / note"
    );
    for (f, v) in rows {
        let what = if v.note.is_empty() {
            v.migration.clone()
        } else {
            format!("{} / {}", v.migration, v.note)
        };
        out.push_str(&format!(
            "{:<42} {:<5} {:<8} {:>7} {:>6.1}  {}\n",
            f.to_string(),
            if v.pass { "pass" } else { "FAIL" },
            v.runs_on.as_deref().unwrap_or("stopped"),
            v.records,
            v.secs,
            what.replace('\n', " ")
        ));
    }
    out
}
