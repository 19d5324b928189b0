//! The benchmark that `scripts/bench migrated` runs: live migrations of an idle guest back and
//! forth between two hosts, driven through migratectl as an operator would, with every lease
//! flip included.
//!
//! storaged and two hosts a and b, each in its own network namespace with its own migrated (as
//! in the demo, in TLS unless `TLS=0`); the test guest boots on host a with `MEM` MiB (default
//! 256), its root file system read-only from the image and two 64 MiB storaged volumes as data
//! disks. Then `RUNS` migrations (default 20) alternate a -> b, b -> a, each
//! `migratectl --json migrate vm1 --to HOST`; the final records give the figures. The guest
//! must still be the one that booted (its boot id) at the end.
//!
//! The table: p50, p99 (nearest rank) and max over the runs of the total time, the downtime
//! (the destination VMM's measure: the source's last vCPU pause to its own first vCPU run) and
//! its parts from the record's timeline: pause -> handed-over (the rest of the state sent and
//! the migrated that flips, the destination's, told of it), handed-over -> flipped (its group
//! flip of both volumes; storaged's own flip time beside it) and flipped -> resumed (its VMM
//! told to run the guest, its first vCPU run). The parts come from the wall clocks of both
//! hosts: here they are one machine's.

use anyhow::{bail, Context, Result};
use e2e::image::guest_image;
use e2e::migrated::{agent_of, write_guest_toml};
use e2e::stats::percentile;
use e2e::two_hosts::TwoHosts;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Agent ready after `migratectl run` (guest kernel code is emulated on the development machines).
const BOOT: Duration = Duration::from_secs(600);
/// One agent reply.
const REPLY: Duration = Duration::from_secs(120);
/// The guest's storaged volumes.
const VOLUMES: [&str; 2] = ["vm1-data", "vm1-data2"];

/// One migration's figures, in milliseconds (NaN where the record has no such figure).
#[derive(Debug, Clone, Copy)]
struct Run {
    total: f64,
    downtime: f64,
    handover: f64,
    flips: f64,
    storaged_flip: f64,
    resume: f64,
}

impl Run {
    /// The figures of a completed migration's record.
    fn of(rec: &Value) -> Result<Run> {
        if rec["phase"] != "completed" {
            bail!(
                "migration {} ended {}: {}",
                rec["id"],
                rec["phase"],
                rec["error"]
            );
        }
        let f = &rec["figures"];
        let num = |v: &Value| v.as_u64().map(|n| n as f64).unwrap_or(f64::NAN);
        let t = &f["timeline"];
        let at = |k: &str| match t[k].as_u64() {
            Some(us) if us > 0 => us as f64,
            _ => f64::NAN,
        };
        let between = |a: &str, b: &str| (at(b) - at(a)) / 1000.0;
        Ok(Run {
            total: num(&f["total_ms"]),
            downtime: num(&f["vmm_downtime_us"]) / 1000.0,
            handover: between("paused_at_us", "handed_over_at_us"),
            flips: between("handed_over_at_us", "flipped_at_us"),
            storaged_flip: storaged_flip_ms(rec),
            resume: between("flipped_at_us", "resumed_at_us"),
        })
    }
}

/// storaged's own time for the group flip: the longest of the volumes' flip times that the
/// record notes (`volume V: lease flipped to H (epoch E, N us)`), in ms.
fn storaged_flip_ms(rec: &Value) -> f64 {
    let notes = rec["steps"].as_array().cloned().unwrap_or_default();
    notes
        .iter()
        .filter_map(|s| {
            let note = s["note"].as_str()?;
            let rest = note.split_once("lease flipped to ")?.1;
            let us = rest.rsplit_once(", ")?.1.strip_suffix(" us)")?;
            us.parse::<f64>().ok()
        })
        .fold(f64::NAN, f64::max)
        / 1000.0
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

fn main() -> Result<()> {
    let runs: usize = env_or("RUNS", "20").parse().context("RUNS")?;
    let mem: u32 = env_or("MEM", "256").parse().context("MEM")?;
    let tls = env_or("TLS", "1") != "0";
    let keep = env_or("KEEP", "0") == "1";
    let image = guest_image();
    let dir = tempfile::Builder::new()
        .prefix("bench-migrated.")
        .tempdir()?;
    let say = |s: String| eprintln!("[bench migrated] {s}");

    let h = TwoHosts::start_with(dir.path(), &VOLUMES, 3000, tls)?;
    let toml = dir.path().join("vm1.toml");
    write_guest_toml(&toml, "vm1", &image, mem, &VOLUMES)?;
    let t = Instant::now();
    let rec = h.a.ctl(&["run", toml.to_str().context("path")?])?;
    let agent = agent_of(&rec, &dir.path().join("serial-a.log"))?;
    let boot_id = agent
        .wait_ready(BOOT)
        .context("guest boot")?
        .get("boot_id")
        .context("boot_id")?
        .to_string();
    drop(agent);
    say(format!(
        "guest ready on a after {:.1} s ({mem} MiB, volumes {}, TLS {tls})",
        t.elapsed().as_secs_f64(),
        VOLUMES.join(" ")
    ));

    let mut results = Vec::new();
    let mut on = "a";
    for i in 1..=runs {
        let to = if on == "a" { "b" } else { "a" };
        let out = h
            .agent(on)
            .ctl_raw(&["--json", "migrate", "vm1", "--to", to])?;
        let rec: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "migratectl printed no record: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let run = Run::of(&rec)?;
        say(format!("run {i}/{runs}: {on} -> {to}: {run:?}"));
        h.agent(to).wait_state("vm1", "running", REPLY)?;
        results.push(run);
        on = to;
    }

    let inst = h.agent(on).instance("vm1")?;
    let mut agent = agent_of(&inst, &dir.path().join("serial-end.log"))?;
    let clock = agent.command("clock", REPLY)?;
    if clock.get("boot_id") != Some(boot_id.as_str()) {
        bail!("the guest rebooted: boot id {boot_id} before, {clock:?} after");
    }
    if keep {
        say(format!("kept {}", dir.keep().display()));
    }
    report(&results, mem, tls);
    Ok(())
}

/// One row of the table: its name and its figure of a run.
type Row = (&'static str, fn(&Run) -> f64);

fn report(results: &[Run], mem: u32, tls: bool) {
    println!(
        "migratectl migrate, idle guest {mem} MiB, {} storaged volumes, TLS {tls}, {} migrations \
         back and forth (ms; parts of the downtime from the record's timeline)",
        VOLUMES.len(),
        results.len()
    );
    println!("{:<30} {:>9} {:>9} {:>9}", "", "p50", "p99", "max");
    let rows: [Row; 6] = [
        ("total", |r| r.total),
        ("downtime (pause -> vCPU run)", |r| r.downtime),
        ("  pause -> handed-over", |r| r.handover),
        ("  handed-over -> flipped", |r| r.flips),
        ("    storaged's group flip", |r| r.storaged_flip),
        ("  flipped -> resumed", |r| r.resume),
    ];
    for (name, f) in rows {
        let mut v: Vec<f64> = results.iter().map(f).filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            println!("{name:<30} {:>9}", "n/a");
            continue;
        }
        v.sort_by(f64::total_cmp);
        println!(
            "{name:<30} {:>9.2} {:>9.2} {:>9.2}",
            percentile(&v, 0.5),
            percentile(&v, 0.99),
            v[v.len() - 1]
        );
    }
}
