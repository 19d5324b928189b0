//! The demo that `scripts/demo` runs: the product end to end, as far as it exists, narrated.
//!
//! storaged serves the guest's volumes; the VMM boots the test guest with its root and data
//! disks on storaged, held as primary by host "a"; the agent's workloads run; the data volume's
//! lease is flipped to host "b" and host "a" is fenced. Everything started is stopped at the end.

use agent_proto::{expected_checksum, Record, RECORD_SIZE};
use anyhow::{bail, Context, Result};
use e2e::image::guest_image;
use e2e::storaged::{client_config, Storaged};
use e2e::vmm::{Disk, VmmConfig, VmmGuest};
use std::process::Command;
use std::time::{Duration, Instant};
use storaged::client::{Client, ClientError};
use storaged::protocol::RequestedState;

const BOOT: Duration = Duration::from_secs(600);
const REPLY: Duration = Duration::from_secs(60);
const MEM_MIB: usize = 8;
/// `mem start` faults its buffer in, page by page in emulated guest kernel code.
const MEM_START: Duration = Duration::from_secs(600);

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn say(text: impl AsRef<str>) {
    println!("    {}", text.as_ref());
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
    let rt = tokio::runtime::Runtime::new()?;

    step(1, "storaged: volumes over NBD with per-host leases");
    let storaged = Storaged::start(dir.path())?;
    say(format!(
        "NBD on {}, REST API on {}",
        storaged.nbd, storaged.api
    ));
    let root_size = std::fs::metadata(&image.rootfs)?.len();
    storaged.create_volume(
        "vm1-root",
        &root_size.to_string(),
        &["--anonymous", "read-write-without-primary"],
    )?;
    storaged.create_volume("vm1-data", "64M", &[])?;
    let out = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&image.rootfs)
        .arg(storaged.uri("vm1-root"))
        .output()?;
    if !out.status.success() {
        bail!("qemu-img convert: {}", String::from_utf8_lossy(&out.stderr));
    }
    say(format!(
        "volume vm1-root ({} MiB): the guest's root filesystem, written by an unmodified qemu-img over NBD",
        root_size >> 20
    ));
    say("volume vm1-data (64 MiB): the agent's disk workload");

    step(
        2,
        "vmm on host a: the test guest boots from its storaged volumes (leases: primary)",
    );
    let spec = |vol: &str| format!("{},volume={vol},host=a,instance=vm1", storaged.nbd);
    let mut vm = VmmGuest::start(&VmmConfig {
        image: &image,
        root: Some(Disk::Storaged(spec("vm1-root"))),
        data_disks: vec![Disk::Storaged(spec("vm1-data"))],
        mem_mib: 256,
        vcpus: 1,
        work_dir: dir.path(),
    })?;
    let ready = vm.agent.wait_ready(BOOT).context("guest boot")?;
    say(format!(
        "guest agent ready: {:.1} s after the VMM started ({:.1} s of it guest kernel boot, emulated here)",
        vm.started.elapsed().as_secs_f64(),
        ready.num("uptime_ms").unwrap_or(0) as f64 / 1000.0
    ));
    let boot_id = ready.get("boot_id").unwrap_or("?").to_string();
    say(format!("boot id {boot_id}"));
    say(storaged.cli(&["lease", "list", "vm1-data"])?.trim_end());

    step(3, "the agent's workloads");
    let agent = &mut vm.agent;
    let m = agent.command(&format!("mem start {MEM_MIB}"), MEM_START)?;
    say(format!(
        "memory: {MEM_MIB} MiB rewritten pass after pass (touched in {} ms)",
        m.get("touch_ms").unwrap_or("?")
    ));
    agent.command("disk start", REPLY)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let disk = loop {
        let d = agent.command("disk status", REPLY)?;
        if d.num("acked").unwrap_or(0) >= 512 || Instant::now() > deadline {
            break d;
        }
    };
    let mem = agent.command("mem status", REPLY)?;
    let seqs = mem.nums("seqs").unwrap_or_default();
    let sum_ok = mem.num("checksum") == Some(expected_checksum(MEM_MIB, &seqs));
    say(format!(
        "memory: pass {}, {} wrong words, checksum {} , largest pause {} us",
        mem.num("seq").unwrap_or(0),
        mem.num("errors").unwrap_or(0),
        if sum_ok { "verified" } else { "WRONG" },
        mem.num("maxgap_us").unwrap_or(0)
    ));
    say(format!(
        "disk: {} records durable on vm1-data (O_DIRECT + fsync through storaged)",
        disk.num("acked").unwrap_or(0)
    ));

    step(4, "pause and resume through the VMM's API");
    let (code, _) = vm.api("PUT", "/v1/vm/pause")?;
    say(format!("PUT /v1/vm/pause -> {code}"));
    let (_, info) = vm.api("GET", "/v1/vm")?;
    say(format!("GET /v1/vm -> {}", info.trim()));
    let (code, _) = vm.api("PUT", "/v1/vm/resume")?;
    say(format!("PUT /v1/vm/resume -> {code}"));
    let after = vm.agent.command("mem status", REPLY)?;
    say(format!(
        "memory: pass {} after resume, {} wrong words, the guest saw a pause of {} us",
        after.num("seq").unwrap_or(0),
        after.num("errors").unwrap_or(0),
        after.num("maxgap_us").unwrap_or(0)
    ));

    step(
        5,
        "lease flip: host b takes vm1-data over, host a is fenced",
    );
    let standby = client_config(&storaged, "vm1-data", "b", RequestedState::Standby);
    let b = rt.block_on(Client::connect(&standby))?;
    say("host b: standby connection open (handshake done, no data access)");
    let report = rt.block_on(b.flip())?;
    say(format!("flip acknowledged: {report:?}"));
    say(storaged.cli(&["lease", "list", "vm1-data"])?.trim_end());
    let deadline = Instant::now() + Duration::from_secs(120);
    let fenced = loop {
        let d = vm.agent.command("disk status", REPLY)?;
        if d.get("state") != Some("running") || Instant::now() > deadline {
            break d;
        }
    };
    say(format!(
        "guest on host a: disk writer {} after {} durable records (its writes are refused)",
        fenced.get("state").unwrap_or("?"),
        fenced.num("acked").unwrap_or(0)
    ));
    let again = client_config(&storaged, "vm1-data", "a", RequestedState::Primary);
    match rt.block_on(Client::connect(&again)) {
        Err(ClientError::Deactivated { message }) => say(format!(
            "host a reconnecting: refused, deactivated ({message})"
        )),
        Err(e) => say(format!("host a reconnecting: refused ({e})")),
        Ok(_) => bail!("host a could reconnect after the flip"),
    }
    let acked = fenced.num("acked").unwrap_or(0);
    let mut valid = 0;
    while valid < acked {
        let data = rt.block_on(b.read(valid * RECORD_SIZE as u64, RECORD_SIZE))?;
        if Record::decode(&data, valid).is_none() {
            break;
        }
        valid += 1;
    }
    say(format!(
        "host b reads vm1-data: {valid} of the {acked} records host a had made durable verify"
    ));
    if valid != acked {
        bail!("records lost across the flip");
    }

    step(6, "live migration");
    say("not there yet: the VMM's migration stream and migrated (the per-host agent and");
    say("migratectl) are the next pieces; this demo will then move the guest between two");
    say("hosts in network namespaces and back, with the figures.");

    step(7, "teardown");
    drop(vm);
    drop(storaged);
    say(format!(
        "everything stopped; demo took {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}
