//! The demo that `scripts/demo` runs: the product end to end, narrated.
//!
//! storaged and two hosts "a" and "b", each in its own network namespace joined by veth, each
//! host with its own migrated, and TLS everywhere: a cluster CA (`storaged pki ca`) certifies
//! every host (`storaged pki host`); storaged takes NBD only in TLS with a certificate of the
//! cluster from clients not on loopback, the VMMs and the vhost-user-blk backends prove their
//! host with it, and the migration streams and the agents' calls to each other run in mutual
//! TLS. The test guest boots on host a from a storaged root volume (and a data volume for its
//! disk workload, served by a vhost-user-blk process beside the VMM); its memory and disk
//! workloads run; migratectl moves it to host b and back with its progress bar, and the figures
//! are printed. Between the two legs, a connection host a opened as the volume's primary before
//! the flip tries to write: refused, and so are a new connection from host a and one without a
//! certificate. Everything started is stopped at the end.

use anyhow::{bail, Context, Result};
use e2e::agent::AgentConn;
use e2e::image::guest_image;
use e2e::migrated::{agent_of, StaleWriter, TwoHosts};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(600);
const REPLY: Duration = Duration::from_secs(120);
const MEM_MIB: usize = 8;
/// `mem start` faults its buffer in, page by page in emulated guest kernel code.
const MEM_START: Duration = Duration::from_secs(600);

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn say(text: impl AsRef<str>) {
    for line in text.as_ref().lines() {
        println!("    {line}");
    }
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
        "three hosts, each a network namespace on one bridge: storage, a and b",
    );
    let h = TwoHosts::start_with(dir.path(), &["vm1-data"], 3000, true)?;
    for name in ["storage", "a", "b"] {
        let host = h.rig.host(name);
        say(format!("{name:<8} {} (netns {})", host.addr, host.netns));
    }
    say(
        "TLS: `storaged pki ca` made the cluster's CA, `storaged pki host` a certificate per \
         host; its identity is the host id",
    );
    say(format!(
        "storaged on storage: NBD {} (TLS with a cluster certificate required off loopback), \
         REST API {} (it and both agents' APIs take only requests with the cluster's token)",
        h.storaged.nbd, h.storaged.api
    ));
    say(format!(
        "migrated on a: {}, on b: {} (peers of each other, in mutual TLS)",
        h.a.listen, h.b.listen
    ));

    step(2, "the guest's volumes on storaged");
    let root_size = std::fs::metadata(&image.rootfs)?.len();
    h.storaged.cli(&[
        "volume",
        "create",
        "vm1-root",
        "--size",
        &root_size.to_string(),
        "--anonymous",
        "read-write-without-primary",
        "--host",
        "a",
        "--host",
        "b",
    ])?;
    h.storaged
        .cli(&["volume", "access", "vm1-data", "--host", "a", "--host", "b"])?;
    // An operator's certificate of the cluster, for qemu-img (it holds no lease: anonymous).
    let storage = h.rig.host("storage");
    let pki = h.pki.as_ref().context("TLS")?;
    let admin = pki.host_at("admin", &[storage.addr.into()])?;
    let nbd_port = h.storaged.nbd.rsplit_once(':').context("NBD address")?.1;
    let out = storage
        .command("qemu-img")
        .args(["convert", "-n", "-f", "raw", "--object"])
        .arg(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            admin.display()
        ))
        .arg("--target-image-opts")
        .arg(&image.rootfs)
        .arg(format!(
            "driver=nbd,host={},port={nbd_port},export=vm1-root,tls-creds=tls0",
            storage.addr
        ))
        .output()?;
    if !out.status.success() {
        bail!("qemu-img convert: {}", String::from_utf8_lossy(&out.stderr));
    }
    say(format!(
        "vm1-root ({} MiB): the guest's root filesystem, written by an unmodified qemu-img over \
         NBD in TLS with an operator's certificate",
        root_size >> 20
    ));
    say("vm1-data (64 MiB): the agent's disk workload, served by a vhost-user-blk process");
    say("leases on both: hosts a and b only (any other host of the cluster gets none)");

    step(
        3,
        "migratectl run: the guest boots on host a from its storaged volumes",
    );
    let toml = dir.path().join("vm1.toml");
    std::fs::write(
        &toml,
        format!(
            "name = \"vm1\"\nkernel = {:?}\ncmdline = {:?}\nmemory_mib = 256\nvcpus = 1\n\
             [[disks]]\nvolume = \"vm1-root\"\n\
             [[disks]]\nvolume = \"vm1-data\"\nbackend = \"vhost-user\"\n",
            image.kernel.display().to_string(),
            image.cmdline
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
    say(h.storaged.cli(&["lease", "list", "vm1-data"])?.trim_end());

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
    let stale = StaleWriter::open(&h, "a", "vm1-data")?;
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
    say(h.storaged.cli(&["lease", "list", "vm1-data"])?.trim_end());

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
    let acked = agent.command("disk stop", REPLY)?.num("acked").unwrap_or(0);
    let v = agent.command("disk verify", REPLY)?;
    say(format!(
        "disk: {} of the {acked} acknowledged records verify, written by {} boot(s)",
        v.num("verified").unwrap_or(0),
        v.num("boot_ids").unwrap_or(0)
    ));
    if v.num("verified") != Some(acked) {
        bail!("acknowledged disk records lost");
    }
    let vmms = h.a.vmm_pids().len() + h.b.vmm_pids().len();
    say(format!("VMMs running the guest: {vmms}"));

    step(8, "teardown");
    let stopped = h.a.ctl(&["stop", "vm1"])?;
    say(format!("migratectl stop vm1: {}", stopped["state"]));
    drop(agent);
    drop(h);
    say(format!(
        "agents, storaged and namespaces removed; demo took {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
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
fn migrate(h: &TwoHosts, from: &str, to: &str) -> Result<(Value, String)> {
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
