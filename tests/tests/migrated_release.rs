//! The leases a guest no longer needs on a host are released there (guests restored from the
//! suite's booted guest, two agents and storaged on loopback): `migratectl stop` ends the
//! host's primary lease, so the guest starts on another host at once; with storaged down the
//! guest still stops and migratectl names the command that releases the lease, which does once
//! storaged is back. A destination that abandons an incoming migration (its source crashed
//! before the hand-over) while storaged is down revokes its standby lease once storaged answers
//! again, instead of leaving it to storaged's standby expiry.

use e2e::migrated::{write_restored_guest_toml, Migrated};
use e2e::process::{run_ok, wait_for};
use e2e::storaged::Storaged;
use e2e::GuestTest;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

/// An agent `host` on loopback with storaged `s`, `peers` and environment `env`.
fn agent(
    dir: &Path,
    host: &str,
    s: &Storaged,
    peers: &[(&str, &str)],
    env: &[(&str, &str)],
) -> Migrated {
    Migrated::on_loopback(dir, host, s, peers, |o| {
        o.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        o.peer_timeout_ms = 2000;
    })
    .unwrap()
}

#[test]
fn stop_releases_the_primary_lease_or_says_how() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("stop_releases_the_primary_lease_or_says_how")
    else {
        return;
    };
    let mut storaged =
        Storaged::start_with_data_volume(&dir.path().join("storaged"), "vm1-data").unwrap();
    let a = agent(dir.path(), "host-a", &storaged, &[], &[]);
    let b = agent(dir.path(), "host-b", &storaged, &[], &[]);
    let toml = dir.path().join("vm1.toml");
    let booted = e2e::snapshot::booted(&image).unwrap();
    write_restored_guest_toml(&toml, "vm1", &image, &booted, "vm1-data").unwrap();
    let toml = toml.to_str().unwrap();

    let rec = a.ctl(&["run", toml]).unwrap();
    assert_eq!(rec["state"], "running", "{rec}");
    assert_eq!(
        storaged.lease_state("vm1-data", "host-a").as_deref(),
        Some("primary")
    );

    // Stopped on a: its primary lease is gone, and the guest starts on b.
    let out = a.ctl_raw(&["stop", "vm1"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("volume vm1-data: primary lease released"),
        "{text}"
    );
    assert_eq!(storaged.lease_state("vm1-data", "host-a"), None);
    let rec = b.ctl(&["run", toml]).unwrap();
    assert_eq!(rec["state"], "running", "{rec}");
    assert_eq!(
        storaged.lease_state("vm1-data", "host-b").as_deref(),
        Some("primary")
    );

    // storaged down: b still stops the guest, keeps the lease and says how to release it.
    storaged.terminate().unwrap();
    let stopped = b.ctl(&["stop", "vm1"]).unwrap();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(b.vmm_pids().is_empty());
    let lease = &stopped["leases"][0];
    assert_eq!(lease["volume"], "vm1-data", "{stopped}");
    assert_eq!(lease["outcome"], "kept", "{stopped}");
    assert_eq!(lease["state"], serde_json::Value::Null, "{stopped}");
    let command = lease["command"].as_str().unwrap().to_string();
    let api = storaged.api.to_string();
    assert_eq!(
        command,
        format!("storaged lease revoke vm1-data --host host-b --api {api}")
    );
    storaged.start_again().unwrap();
    assert_eq!(
        storaged.lease_state("vm1-data", "host-b").as_deref(),
        Some("primary")
    );
    let words: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(words[0], "storaged");
    run_ok(Command::new(e2e::binary("storaged")).args(&words[1..])).unwrap();
    assert_eq!(storaged.lease_state("vm1-data", "host-b"), None);

    // The text form says the same, and `stop` of a stopped guest releases what is left.
    let rec = a.ctl(&["run", toml]).unwrap();
    assert_eq!(rec["state"], "running", "{rec}");
    storaged.terminate().unwrap();
    let out = a.ctl_raw(&["stop", "vm1"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("volume vm1-data: lease kept: ")
            && text.contains(&format!(
                "release it with: storaged lease revoke vm1-data --host host-a --api {api}"
            )),
        "{text}"
    );
    storaged.start_again().unwrap();
    let again = a.ctl(&["stop", "vm1"]).unwrap();
    assert_eq!(again["leases"][0]["outcome"], "released", "{again}");
    assert_eq!(storaged.lease_state("vm1-data", "host-a"), None);
}

#[test]
fn an_abandoned_incoming_migration_leaves_no_standby_lease() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("an_abandoned_incoming_migration_leaves_no_standby_lease")
    else {
        return;
    };
    let mut storaged =
        Storaged::start_with_data_volume(&dir.path().join("storaged"), "vm1-data").unwrap();
    let b = agent(dir.path(), "host-b", &storaged, &[], &[]);
    // a dies right after it recorded the pre-copy, before its VMM sends anything.
    let a = agent(
        dir.path(),
        "host-a",
        &storaged,
        &[("host-b", &b.listen)],
        &[("VMHOP_CRASH_AT", "source.precopy")],
    );
    let toml = dir.path().join("vm1.toml");
    let booted = e2e::snapshot::booted(&image).unwrap();
    write_restored_guest_toml(&toml, "vm1", &image, &booted, "vm1-data").unwrap();
    let rec = a.ctl(&["run", toml.to_str().unwrap()]).unwrap();
    assert_eq!(rec["state"], "running", "{rec}");

    a.ctl(&["migrate", "vm1", "--to", "host-b", "--no-wait"])
        .unwrap();
    wait_for("b's standby lease", LIMIT, || {
        (storaged.lease_state("vm1-data", "host-b").as_deref() == Some("standby")).then_some(())
    })
    .unwrap();
    // storaged goes down before b gives the migration up (its source is silent).
    storaged.terminate().unwrap();
    let m = b.wait_migration_phase("vm1", "aborted", LIMIT).unwrap();
    assert!(
        m["error"]
            .as_str()
            .unwrap_or("")
            .contains("source host-a lost"),
        "{m}"
    );
    assert!(b.vmm_pids().is_empty());
    storaged.start_again().unwrap();
    wait_for("b's standby lease to be released", LIMIT, || {
        storaged
            .lease_state("vm1-data", "host-b")
            .is_none()
            .then_some(())
    })
    .unwrap();
    // a's primary lease stays: its guest runs on.
    assert_eq!(
        storaged.lease_state("vm1-data", "host-a").as_deref(),
        Some("primary")
    );
    assert!(b.log().contains("lease-release"), "{}", b.log());
}
