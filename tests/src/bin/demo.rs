//! The demo that `scripts/demo` runs: the product end to end, narrated.
//!
//! Storage is a small cluster: one etcd member (Debian's etcd-server) and two storaged nodes,
//! storage-1 and storage-2, each on a host of its own; two KVM hosts "a" and "b" each run their
//! migrated. Every host is a network namespace on one bridge, and TLS runs everywhere: a
//! cluster CA (`storaged pki ca`) certifies every host and node (`storaged pki host`); the nodes
//! take NBD only in TLS with a certificate of the cluster and replicate to each other in mutual
//! TLS, the VMMs and the vhost-user-blk backends prove their host with it, and the migration
//! streams and the agents' calls to each other run in mutual TLS. The guest's data volume has a
//! copy on both nodes (a per-volume master elected in etcd forwards every write to the slave
//! before acknowledging it); the agents, and so the VMMs and disk backends, are given both
//! nodes' addresses.
//!
//! The guest's root file system is a second replicated volume, imported from the image and
//! attached read-only; when the two volumes' masters are different nodes, every lease change
//! of a migration goes to both, each master taking its volume. The test guest boots on host a
//! from it, with its data volume for its disk workload, served by a vhost-user-blk process
//! beside the VMM; its memory and disk workloads run; migratectl moves it to host b and back with its
//! progress bar, and the figures are printed. Between the two legs, a connection host a opened
//! as the volume's primary before the flip tries to write: refused, and so are a new connection
//! from host a and one without a certificate. Then, while the guest's disk workload writes, the
//! master of its data volume is killed (SIGKILL): the slave is elected, the disk backend
//! reconnects to it with its lease, the workload goes on, the killed node comes back as a slave
//! and is copied in sync again, and every acknowledged record verifies in the guest. Everything
//! started is stopped at the end.

use anyhow::{bail, Context, Result};
use e2e::agent::AgentConn;
use e2e::cluster_hosts::{other_node, ClusterHosts, NODES};
use e2e::image::guest_image;
use e2e::migrated::agent_of;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use storaged_client::cluster::ReplicatedVolumeView;

const BOOT: Duration = Duration::from_secs(600);
const REPLY: Duration = Duration::from_secs(120);
const MEM_MIB: usize = 8;
/// `mem start` faults its buffer in, page by page in emulated guest kernel code.
const MEM_START: Duration = Duration::from_secs(600);
/// The volume's copies: one on each node.
const REPLICAS: &str = "2";

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn say(text: impl AsRef<str>) {
    for line in text.as_ref().lines() {
        println!("    {line}");
    }
}

/// Where a replicated volume's copies are and who is master.
fn copies(volume: &str, master: &str, v: &ReplicatedVolumeView) -> String {
    format!(
        "{volume}: copies on {}, in sync: {}; master {master} (term {}), slave {}",
        v.placement.replicas.join(" and "),
        v.insync.members.join(", "),
        v.term,
        other_node(master)
    )
}

fn main() -> Result<()> {
    let started = Instant::now();
    println!("vmhop demo: live migration of KVM guests whose disks live on network block storage");
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        bail!("/dev/kvm is not usable here: the demo needs KVM");
    }
    let image = guest_image();
    let dir = tempfile::Builder::new().prefix("vmhop-demo.").tempdir()?;

    step(
        1,
        "five hosts, each a network namespace on one bridge: etcd, storage-1, storage-2, a and b",
    );
    let mut h = ClusterHosts::start(dir.path(), 3000)?;
    for name in ["etcd", NODES[0], NODES[1], "a", "b"] {
        let host = h.rig.host(name);
        say(format!("{name:<10} {} (netns {})", host.addr, host.netns));
    }
    say(
        "TLS: `storaged pki ca` made the cluster's CA, `storaged pki host` a certificate per \
         host and per storage node; its identity is the host id (a node's id is its own)",
    );
    say(format!(
        "etcd (Debian's etcd-server, one member): {}",
        h.cluster.etcd.endpoint
    ));
    for n in NODES {
        let s = &h.cluster.node(n).storaged;
        say(format!(
            "storaged on {n}: `storaged serve --etcd ...`, NBD {} (TLS with a cluster \
             certificate required), REST API {}",
            s.nbd, s.api
        ));
    }
    say("every REST API (both nodes', both agents') takes only requests with the cluster's token");
    say(format!(
        "migrated on a: {}, on b: {} (peers of each other, in mutual TLS), each given both \
         nodes' NBD addresses",
        h.a.listen, h.b.listen
    ));

    step(
        2,
        "the guest's data volume, replicated on both storage nodes",
    );
    create_volume(&h, NODES[0], "vm1-data", "64M")?;
    let (master, v) = h.wait_master(NODES[0], "vm1-data")?;
    say("vm1-data (64 MiB): the agent's disk workload, served by a vhost-user-blk process");
    say("leases: hosts a and b only (any other host of the cluster gets none)");
    say(copies("vm1-data", &master, &v));
    // The root file system: created through the other node (whose election starts first
    // there), imported over NBD in TLS as host a.
    let size = std::fs::metadata(&image.rootfs)?.len().to_string();
    create_volume(&h, NODES[1], "vm1-root", &size)?;
    let t = Instant::now();
    let pki = h.cluster.pki.as_ref().context("the cluster's CA")?;
    let imported = e2e::process::run_ok(
        h.rig
            .host("a")
            .command(e2e::binary("storaged"))
            .args(["volume", "import", "vm1-root"])
            .arg(&image.rootfs)
            .args(["--nbd", &h.cluster.nbd_addresses().join(",")])
            .args(["--api", &h.cluster.node(NODES[1]).storaged.api.to_string()])
            .arg("--token-file")
            .arg(h.token_file())
            .arg("--tls-dir")
            .arg(pki.host("a")?),
    )?;
    let (root_master, rv) = h.wait_master(NODES[1], "vm1-root")?;
    say(format!(
        "vm1-root ({} MiB): the guest's root file system, imported from its image in {:.1} s \
         (`storaged volume import`, over NBD in TLS as host a: {})",
        image_mib(&image.rootfs),
        t.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&imported.stdout)
            .lines()
            .last()
            .unwrap_or("")
            .trim()
    ));
    say(copies("vm1-root", &root_master, &rv));
    say(if root_master == master {
        format!("both volumes are mastered on {master}: each flip is one transaction there")
    } else {
        format!(
            "the volumes are mastered on different nodes: each lease change of a migration \
             goes to both masters, each taking its volume ({master}: vm1-data, {root_master}: \
             vm1-root)"
        )
    });

    step(
        3,
        "migratectl run: the guest boots on host a, its data disk on the storage cluster",
    );
    let toml = dir.path().join("vm1.toml");
    std::fs::write(
        &toml,
        format!(
            "name = \"vm1\"\nkernel = {:?}\ncmdline = {:?}\nmemory_mib = 256\nvcpus = 1\n\
             [[disks]]\nvolume = \"vm1-root\"\nread_only = true\n\
             [[disks]]\nvolume = \"vm1-data\"\nbackend = \"vhost-user\"\n",
            image.kernel.display().to_string(),
            image.cmdline,
        ),
    )?;
    let t = Instant::now();
    let rec = h.a.ctl(&["run", toml.to_str().context("path")?])?;
    let mut agent = agent_of(&rec, &dir.path().join("serial-a.log"))?;
    let ready = agent.wait_ready(BOOT).context("guest boot")?;
    say(format!(
        "guest agent ready {:.1} s after `run` (guest kernel boot, emulated on this machine)",
        t.elapsed().as_secs_f64()
    ));
    let boot_id = ready.get("boot_id").unwrap_or("?").to_string();
    say(format!(
        "VMM pid {} on a, guest boot id {boot_id}",
        rec["pid"]
    ));
    say(leases(&h, NODES[0])?);

    step(4, "the agent's workloads");
    let m = agent.command(&format!("mem start {MEM_MIB}"), MEM_START)?;
    say(format!(
        "memory: {MEM_MIB} MiB rewritten pass after pass, verified word by word (touched in {} ms)",
        m.get("touch_ms").unwrap_or("?")
    ));
    agent.command("disk start", REPLY)?;
    let w = workloads(&mut agent, 0, 0)?;
    say(&w.text);

    // A second connection of host a to vm1-data, as the primary holder, opened before the
    // flip: what a slow or buggy old host could still try to write with.
    let stale = h.stale_writer("a", "vm1-data")?;
    say(format!("host a: {}", stale.opened));

    step(5, "migratectl migrate vm1 --to b");
    let (rec, figures) = migrate(&h, "a", "b")?;
    say(figures);
    drop(agent);
    let on_b = h.b.instance("vm1")?;
    let mut agent = agent_of(&on_b, &dir.path().join("serial-b.log"))?;
    let w = workloads(&mut agent, w.seq, w.acked)?;
    same_boot(&mut agent, &boot_id)?;
    say(format!(
        "on b (VMM pid {}), same boot {boot_id}, nothing lost:",
        on_b["pid"]
    ));
    say(&w.text);
    say(format!(
        "host a: instance {}, VMM gone",
        h.a.instance("vm1")?["state"]
    ));
    for s in rec["steps"].as_array().into_iter().flatten() {
        let note = s["note"].as_str().unwrap_or("");
        if note.starts_with("volume ") {
            say(format!("step: {note}"));
        }
    }
    say(leases(&h, NODES[0])?);

    step(6, "fencing: host a writes after the flip");
    for line in stale.attempt()? {
        say(line);
    }

    step(7, "migratectl migrate vm1 --to a: and back");
    let (_, figures) = migrate(&h, "b", "a")?;
    say(figures);
    drop(agent);
    let on_a = h.a.instance("vm1")?;
    let mut agent = agent_of(&on_a, &dir.path().join("serial-a2.log"))?;
    let w = workloads(&mut agent, w.seq, w.acked)?;
    same_boot(&mut agent, &boot_id)?;
    say(format!("on a again (VMM pid {}), same boot:", on_a["pid"]));
    say(&w.text);

    step(
        8,
        "storage failover: the master of vm1-data is killed (SIGKILL) while the guest writes",
    );
    let (master, v) = h.wait_master(NODES[0], "vm1-data")?;
    let slave = other_node(&master);
    say(copies("vm1-data", &master, &v));
    let backend_log = on_a["work_dir"]
        .as_str()
        .map(|d| Path::new(d).join("disk-1.log"))
        .context("the instance's work_dir")?;
    let reconnects = count_reconnects(&backend_log);
    h.cluster.kill9(&master);
    let killed = Instant::now();
    let at_kill = disk_acked(&mut agent)?;
    say(format!(
        "{master} killed with SIGKILL; the guest's writer had {at_kill} records acknowledged"
    ));
    let (now, v) = h.wait_new_master(slave, "vm1-data", &master)?;
    say(format!(
        "{now} is master of vm1-data (term {}, was {master}) {} ms after the kill: its etcd \
         session outlived {master}'s, whose election key expired with its etcd lease; in sync: \
         {}",
        v.term,
        killed.elapsed().as_millis(),
        v.insync.members.join(", ")
    ));
    let term = v.term;
    let first_ack = acked_past(&mut agent, at_kill)?.duration_since(killed);
    say(format!(
        "the guest's first write acknowledged after the kill seen {} ms after it (by {now}; \
         seen by polling the guest, so at most that)",
        first_ack.as_millis()
    ));
    say(match reconnect_after(&backend_log, reconnects) {
        Some(fields) => format!(
            "the disk backend on a held the guest's I/O while no node was master and \
             reconnected to {now} with its primary lease: {fields}"
        ),
        None => format!("the disk backend on a reconnected to {now} with its primary lease"),
    });
    let w = workloads(&mut agent, w.seq, at_kill)?;
    say(&w.text);
    say(leases(&h, slave)?);
    let t = Instant::now();
    h.cluster.restart(&master)?;
    let back = e2e::block_on(
        h.cluster
            .wait_view(slave, "vm1-data", "both copies in sync", |v| {
                v.insync.term == term && v.insync.members.len() == NODES.len()
            }),
    )?;
    say(format!(
        "{master} started again: a slave now, copied from {now} while the guest wrote, in sync \
         again {:.1} s later ({})",
        t.elapsed().as_secs_f64(),
        back.insync.members.join(", ")
    ));
    let acked = agent.command("disk stop", REPLY)?.num("acked").unwrap_or(0);
    let v = agent.command("disk verify", REPLY)?;
    say(format!(
        "disk: {} of the {acked} acknowledged records verify, written by {} boot(s), across two \
         migrations and a storage failover",
        v.num("verified").unwrap_or(0),
        v.num("boot_ids").unwrap_or(0)
    ));
    if v.num("verified") != Some(acked) {
        bail!("acknowledged disk records lost");
    }
    let vmms = h.a.vmm_pids().len() + h.b.vmm_pids().len();
    say(format!("VMMs running the guest: {vmms}"));

    step(9, "teardown");
    let stopped = h.a.ctl(&["stop", "vm1"])?;
    say(format!("migratectl stop vm1: {}", stopped["state"]));
    drop(agent);
    drop(h);
    say(format!(
        "agents, storage nodes, etcd and namespaces removed; demo took {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// vm1-data's lease table, from its master (which also counts the holders' connections) as
/// node `via` names it.
fn leases(h: &ClusterHosts, via: &str) -> Result<String> {
    let (master, _) = h.wait_master(via, "vm1-data")?;
    Ok(h.cli(&master, &["lease", "list", "vm1-data"])?
        .trim_end()
        .to_string())
}

/// Creates `volume` of `size` with [`REPLICAS`] copies through node `via`, leased to hosts a
/// and b only.
fn create_volume(h: &ClusterHosts, via: &str, volume: &str, size: &str) -> Result<()> {
    let args = [
        "volume",
        "create",
        volume,
        "--size",
        size,
        "--replicas",
        REPLICAS,
    ];
    h.cli(via, &[&args[..], &["--host", "a", "--host", "b"]].concat())?;
    Ok(())
}

/// The size of a file in MiB.
fn image_mib(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len() >> 20)
}

/// The guest's acknowledged disk records.
fn disk_acked(agent: &mut AgentConn) -> Result<u64> {
    agent
        .command("disk status", REPLY)?
        .num("acked")
        .context("disk status without acked")
}

/// Waits until the guest acknowledged more than `acked` disk records; returns when that was
/// seen.
fn acked_past(agent: &mut AgentConn, acked: u64) -> Result<Instant> {
    let deadline = Instant::now() + REPLY;
    loop {
        if disk_acked(agent)? > acked {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("no disk record acknowledged after {acked}");
        }
    }
}

/// The disk backend log's "storaged volume reconnected" lines so far.
fn count_reconnects(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(RECONNECTED))
        .count()
}

/// What the disk backend logs when its storaged connection is back.
const RECONNECTED: &str = "storaged volume reconnected";

/// The fields of the first "reconnected" line of the backend's log after the first `seen`.
fn reconnect_after(log: &Path, seen: usize) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().filter(|l| l.contains(RECONNECTED)).nth(seen)?;
    let fields: Vec<&str> = line
        .split_whitespace()
        .filter(|f| f.starts_with("held_ms=") || f.starts_with("generation="))
        .collect();
    Some(fields.join(" "))
}

/// What the workloads report.
struct Workloads {
    seq: u64,
    acked: u64,
    text: String,
}

/// Waits until both workloads passed `seq` and `acked`, checking them.
fn workloads(agent: &mut AgentConn, seq: u64, acked: u64) -> Result<Workloads> {
    let deadline = Instant::now() + REPLY;
    loop {
        let m = agent.command("mem status", REPLY)?;
        let d = agent.command("disk status", REPLY)?;
        let (s, a) = (m.num("seq").unwrap_or(0), d.num("acked").unwrap_or(0));
        if m.num("errors") != Some(0) {
            bail!("memory pattern broken: {m:?}");
        }
        if d.get("state") != Some("running") {
            bail!("disk writer stopped: {d:?}");
        }
        let sum_ok = m.num("checksum")
            == Some(agent_proto::expected_checksum(
                MEM_MIB,
                &m.nums("seqs").unwrap_or_default(),
            ));
        if s > seq && a > acked && sum_ok {
            return Ok(Workloads {
                seq: s,
                acked: a,
                text: format!(
                    "memory: pass {s}, 0 wrong words, checksum verified, largest pause the guest saw {} us\n\
                     disk: {a} records durable on vm1-data (O_DIRECT + fsync through storaged)",
                    m.num("maxgap_us").unwrap_or(0)
                ),
            });
        }
        if Instant::now() > deadline {
            bail!("workloads stuck: {m:?} {d:?}");
        }
    }
}

fn same_boot(agent: &mut AgentConn, boot_id: &str) -> Result<()> {
    let c = agent.command("clock", REPLY)?;
    if c.get("boot_id") != Some(boot_id) {
        bail!("the guest rebooted: {c:?}");
    }
    Ok(())
}

/// Runs `migratectl migrate` on `from` with its progress bar on the terminal, then returns the
/// record and the figures.
fn migrate(h: &ClusterHosts, from: &str, to: &str) -> Result<(Value, String)> {
    let agent = h.agent(from);
    let status = Command::new(e2e::binary("migratectl"))
        .arg("--socket")
        .arg(&agent.socket)
        .args(["migrate", "vm1", "--to", to])
        .stdin(Stdio::null())
        .status()?;
    let all = agent.migrations()?;
    let rec = all
        .into_iter()
        .filter(|m| m["instance"] == "vm1" && m["source"] == from)
        .max_by_key(|m| m["started_ms"].as_u64())
        .context("no migration record")?;
    if !status.success() {
        bail!("the migration failed: {rec}");
    }
    let f = &rec["figures"];
    Ok((
        rec.clone(),
        format!(
            "figures: total {} ms; downtime {:.1} ms (from the source's last vCPU pause to the \
             destination's first vCPU run, lease flips included); lease flips {} ms; {:.1} MiB sent",
            f["total_ms"],
            f["vmm_downtime_us"].as_u64().unwrap_or(0) as f64 / 1000.0,
            f["flip_ms"],
            f["bytes_sent"].as_u64().unwrap_or(0) as f64 / (1u64 << 20) as f64
        ),
    ))
}
