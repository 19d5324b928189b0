//! The packaged daemons under a real systemd: three Debian containers booted with
//! systemd-nspawn (`e2e::systemd`), storage, a and b, each in its own network namespace, set up
//! exactly as README's "Installing on hosts" says: the packages installed with `dpkg -i`, the
//! host certificates and the cluster token in /etc, the settings edited, `systemctl enable
//! --now`. Then, as an operator would see it:
//! - each installed unit is clean under the container's own `systemd-analyze verify`;
//! - readiness through sd_notify: once `systemctl enable --now` returns, the unit is active and
//!   its API answers at that moment;
//! - the hardening in force: storaged cannot write outside /var/lib/storaged, migrated and the
//!   guest's VMM (which keeps migrated's mount namespace in its scope) cannot write to /etc;
//! - a guest started by migrated runs in its own scope (vmhop-vm-vm1.scope), not in migrated's
//!   cgroup; `systemctl restart migrated` leaves it running and the new agent re-adopts it; a
//!   `kill -9` of migrated's main process is restarted by systemd, the guest again untouched;
//! - the guest migrates from a to b with the lease flip at the storage container, its memory
//!   memory and disk workloads intact, no reboot;
//! - the journal holds the daemons' structured JSON lines;
//! - `systemctl stop storaged` shuts it down cleanly (exit 0), the leases persist across its
//!   start, and the guest's held disk I/O goes on;
//! - `systemctl stop migrated` on b is clean too (exit 0) and leaves the guest running; the
//!   agent started again re-adopts it.
//!
//! The first run makes the Debian root with debootstrap from Debian's mirror (about a minute,
//! cached afterwards); without the mirror the test fails with the command that makes the root.

use e2e::agent::AgentConn;
use e2e::migrated::write_restored_guest_toml;
use e2e::netns::Rig;
use e2e::pki::Pki;
use e2e::process::wait_for;
use e2e::systemd::{Bind, Container, BOOT};
use e2e::workload::{assert_same_boot, disk_acked_past, stop_and_verify_disk, REPLY};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// Memory the guest's workload rewrites.
const MIB: usize = 16;
/// How long a unit may take to come back after a restart or a crash.
const RESTART: Duration = Duration::from_secs(60);

/// `migratectl --json ARGS` on host `c`.
fn ctl(c: &Container, args: &str) -> Value {
    let out = c.sh(&format!("migratectl --json {args}")).unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The guest agent of `instance` on host `c` (its serial socket, reached from outside).
fn agent_of(c: &Container, instance: &Value, log: &Path) -> AgentConn {
    let path = c.path(instance["serial_socket"].as_str().unwrap());
    let s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    AgentConn::new(s.try_clone().unwrap(), s, log).unwrap()
}

/// Waits for the memory workload to pass `after` and checks it is intact; returns its sequence.
fn mem_advances(agent: &mut AgentConn, after: u64) -> u64 {
    let s = e2e::workload::mem_advances(agent, MIB, after);
    s.num("seq").unwrap()
}

/// The leases of `volume` as storaged lists them: (host, state).
fn leases(storage: &Container, volume: &str) -> Vec<(String, String)> {
    let text = storage
        .sh(&format!(
            "storaged lease list {volume} --token-file /etc/storaged/token"
        ))
        .unwrap();
    e2e::storaged::lease_rows(&text)
}

/// The unit a process of container `c` belongs to, from its cgroup path.
fn cgroup_of(c: &Container, pid: u64) -> String {
    c.sh(&format!("cat /proc/{pid}/cgroup")).unwrap()
}

/// `systemctl enable --now UNIT`, then at once: the unit is active and `check` succeeds.
fn enable_now(c: &Container, unit: &str, check: &str) {
    c.sh(&format!("systemctl enable --now {unit}")).unwrap();
    assert_eq!(
        c.sh(&format!("systemctl is-active {unit}")).unwrap(),
        "active"
    );
    c.sh(check).unwrap_or_else(|e| {
        panic!("{unit} is active but its API does not answer: {e:#}");
    });
}

/// `systemd-analyze verify` of the installed `unit` in `c`: nothing to say.
fn verify_unit(c: &Container, unit: &str) {
    let out = c
        .sh_raw(&format!(
            "systemd-analyze verify --man=no /usr/lib/systemd/system/{unit}"
        ))
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {unit} on {}: {said}",
        c.name
    );
}

/// `path` is read-only in the mount namespace of process `pid` of `c`.
fn read_only_for(c: &Container, pid: u64, path: &str) {
    let out = c
        .sh_raw(&format!("nsenter -t {pid} -m touch {path}"))
        .unwrap();
    assert!(!out.status.success(), "pid {pid} could write {path}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "{out:?}"
    );
}

/// `systemctl stop UNIT` ended it cleanly: exit 0, result success.
fn stopped_cleanly(c: &Container, unit: &str) {
    assert_eq!(c.property(unit, "Result").unwrap(), "success");
    assert_eq!(c.property(unit, "ExecMainStatus").unwrap(), "0");
}

/// Every line the unit logged (its JSON lines, `journalctl -o cat`).
fn journal(c: &Container, unit: &str) -> Vec<Value> {
    let text = c
        .sh(&format!("journalctl -u {unit} -o cat --no-pager"))
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn systemd_hosts_run_restart_and_migrate_a_guest() {
    if !e2e::kvm_available("systemd_hosts_run_restart_and_migrate_a_guest") {
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let image = e2e::image::guest_image();
    let booted = e2e::snapshot::booted(&image).unwrap();
    let root = e2e::systemd::root().unwrap();
    let (storaged_deb, migrated_deb) = e2e::systemd::packages(&dir.path().join("debs")).unwrap();
    eprintln!("root and packages ready after {:?}", t0.elapsed());

    let rig = Rig::new(&["storage", "a", "b"]).unwrap();
    let (s_ip, a_ip, b_ip) = (
        rig.host("storage").addr,
        rig.host("a").addr,
        rig.host("b").addr,
    );
    // What every host sees of this machine: the guest's image and booted snapshot (read-only),
    // and the KVM hosts /dev/kvm. The snapshot is seen outside /tmp (the build directory may
    // be there): the units' PrivateTmp gives migrated, and so its VMMs, a /tmp of their own.
    let snapshots = Bind::ro_at(booted.path.parent().unwrap(), "/var/lib/vmhop-suite");
    let booted = e2e::snapshot::Booted {
        path: snapshots.inside().join(booted.path.file_name().unwrap()),
        ..booted
    };
    let mut shared = vec![
        Bind::ro(image.kernel.parent().unwrap()),
        Bind::ro(image.rootfs.parent().unwrap()),
        snapshots,
    ];
    shared.dedup_by(|x, y| x.path == y.path);
    let mut kvm = shared.clone();
    kvm.push(Bind::rw("/dev/kvm"));
    let boot = |name: &str, binds: &[Bind]| {
        Container::boot(name, &root, dir.path(), &rig.host(name).netns, binds).unwrap()
    };
    let storage = boot("storage", &[]);
    let a = boot("a", &kvm);
    let b = boot("b", &kvm);
    for c in [&storage, &a, &b] {
        let state = c.wait_running(BOOT).unwrap();
        eprintln!("{} is {state} after {:?}", c.name, t0.elapsed());
    }

    // Once, anywhere: the cluster CA and one certificate per host (README).
    let pki = Pki::new(dir.path(), "cluster").unwrap();
    let certs = [
        (&storage, pki.host_at("storage", &[s_ip.into()]).unwrap()),
        (&a, pki.host_at("host-a", &[a_ip.into()]).unwrap()),
        (&b, pki.host_at("host-b", &[b_ip.into()]).unwrap()),
    ];
    // The operator brings each host its package and certificate (here: into /root).
    for (c, tls) in &certs {
        let deb = if c.name == "storage" {
            &storaged_deb
        } else {
            &migrated_deb
        };
        std::fs::copy(deb, c.path("/root").join(deb.file_name().unwrap())).unwrap();
        e2e::process::run_ok(
            std::process::Command::new("cp")
                .arg("-r")
                .arg(tls)
                .arg(c.path("/root/tls")),
        )
        .unwrap();
    }

    // The storage host.
    storage
        .sh("dpkg -i /root/vmhop-storaged_*.deb >/dev/null
             mkdir -p /etc/vmhop && cp -r /root/tls /etc/vmhop/tls
             (umask 077; head -c 32 /dev/urandom | base64 > /etc/storaged/token)")
        .unwrap();
    assert_eq!(
        storage.sh("systemctl is-enabled storaged || true").unwrap(),
        "disabled",
        "the package must not enable the unit"
    );
    verify_unit(&storage, "storaged.service");
    enable_now(
        &storage,
        "storaged",
        "storaged volume list --token-file /etc/storaged/token",
    );
    // ProtectSystem=strict with ReadWritePaths=/var/lib/storaged: in storaged's own mount
    // namespace /etc is read-only and its state directory is not.
    let pid = storage.main_pid("storaged").unwrap();
    read_only_for(&storage, pid.into(), "/etc/storaged/probe");
    storage
        .sh(&format!(
            "nsenter -t {pid} -m touch /var/lib/storaged/probe && rm /var/lib/storaged/probe"
        ))
        .unwrap();
    let token = std::fs::read(storage.path("/etc/storaged/token")).unwrap();

    // The KVM hosts.
    for (c, host, ip, peer, peer_ip) in [
        (&a, "host-a", a_ip, "host-b", b_ip),
        (&b, "host-b", b_ip, "host-a", a_ip),
    ] {
        std::fs::write(c.path("/root/token"), &token).unwrap();
        c.sh(&format!(
            "dpkg -i /root/vmhop-migrated_*.deb >/dev/null
             mkdir -p /etc/vmhop && cp -r /root/tls /etc/vmhop/tls
             install -m 0600 /root/token /etc/migrated/token
             sed -i -e 's/^host_id = .*/host_id = \"{host}\"/' \
                    -e 's/^listen = .*/listen = \"{ip}:7070\"/' \
                    -e 's/10\\.0\\.0\\.9/{s_ip}/' \
                    -e '/^\\[peers\\]/,$d' /etc/migrated/migrated.toml
             printf '[peers]\\n{peer} = \"{peer_ip}:7070\"\\n' >> /etc/migrated/migrated.toml"
        ))
        .unwrap();
        verify_unit(c, "migrated.service");
        enable_now(c, "migrated", "migratectl hosts");
        read_only_for(
            c,
            c.main_pid("migrated").unwrap().into(),
            "/etc/migrated/probe",
        );
    }
    eprintln!("daemons enabled after {:?}", t0.elapsed());

    // A guest on a, started from the suite's booted snapshot with a data volume.
    storage
        .sh(&format!(
            "storaged volume create vm1-data --size {} --token-file /etc/storaged/token",
            e2e::snapshot::DATA_DISK_BYTES
        ))
        .unwrap();
    let toml = dir.path().join("vm1.toml");
    write_restored_guest_toml(&toml, "vm1", &image, &booted, "vm1-data").unwrap();
    std::fs::copy(&toml, a.path("/root/vm1.toml")).unwrap();
    let rec = ctl(&a, "run /root/vm1.toml");
    let vmm = rec["pid"].as_u64().unwrap();
    let mut agent = agent_of(&a, &rec, &dir.path().join("serial-a.log"));
    agent.command(&format!("mem start {MIB}"), REPLY).unwrap();
    agent.command("disk start", REPLY).unwrap();
    let seq = mem_advances(&mut agent, 0);
    let acked = disk_acked_past(&mut agent, 0);

    // Its own scope, outside migrated's cgroup.
    let cg = cgroup_of(&a, vmm);
    assert!(cg.contains("vmhop-vm-vm1.scope"), "{cg}");
    assert!(!cg.contains("migrated.service"), "{cg}");
    assert_eq!(
        a.sh("systemctl is-active vmhop-vm-vm1.scope").unwrap(),
        "active"
    );
    // Out of the unit's cgroup but not out of its sandbox.
    read_only_for(&a, vmm, "/etc/migrated/probe");

    // A restart of the agent: the guest runs on and is re-adopted.
    let before = a.main_pid("migrated").unwrap();
    a.sh("systemctl restart migrated").unwrap();
    assert_eq!(a.sh("systemctl is-active migrated").unwrap(), "active");
    assert_ne!(a.main_pid("migrated").unwrap(), before);
    let again = ctl(&a, "show vm1");
    assert_eq!(again["state"], "running", "{again}");
    assert_eq!(again["pid"].as_u64(), Some(vmm), "{again}");
    let seq = mem_advances(&mut agent, seq);
    let acked = disk_acked_past(&mut agent, acked);

    // A crash of the agent: systemd starts it again, the guest runs on.
    let crashed = a.main_pid("migrated").unwrap();
    a.sh(&format!("kill -9 {crashed}")).unwrap();
    wait_for("systemd to restart migrated", RESTART, || {
        let pid = a.main_pid("migrated").ok()?;
        let active = a.sh("systemctl is-active migrated").ok()? == "active";
        (active && pid != 0 && pid != crashed).then_some(())
    })
    .unwrap();
    assert_eq!(a.property("migrated", "NRestarts").unwrap(), "1");
    assert_eq!(ctl(&a, "show vm1")["pid"].as_u64(), Some(vmm));
    let seq = mem_advances(&mut agent, seq);

    // Live migration from a to b; the lease flips at the storage host.
    assert!(leases(&storage, "vm1-data").contains(&("host-a".into(), "primary".into())));
    let out = a
        .sh_raw("migratectl --json migrate vm1 --to host-b --downtime-ms 300")
        .unwrap();
    if !out.status.success() {
        let why = a
            .sh_raw("tail -n 40 /var/lib/migrated/instances/vm1/vmm.log")
            .unwrap();
        let storaged = storage
            .sh_raw("journalctl -u storaged -o cat --no-pager | tail -n 20")
            .unwrap();
        panic!(
            "the migration failed: {}\nthe source VMM's log:\n{}\nstoraged:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&why.stdout),
            String::from_utf8_lossy(&storaged.stdout)
        );
    }
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["phase"], "completed", "{m}");
    eprintln!("migrated a -> b: {}", m["figures"]);
    let on_b = wait_for("vm1 to run on b", REPLY, || {
        let v = ctl(&b, "show vm1");
        (v["state"] == "running").then_some(v)
    })
    .unwrap();
    let cg = cgroup_of(&b, on_b["pid"].as_u64().unwrap());
    assert!(cg.contains("vmhop-vm-vm1.scope"), "{cg}");
    let l = leases(&storage, "vm1-data");
    assert!(l.contains(&("host-b".into(), "primary".into())), "{l:?}");
    drop(agent);
    let mut agent = agent_of(&b, &on_b, &dir.path().join("serial-b.log"));
    let seq = mem_advances(&mut agent, seq);
    let acked = disk_acked_past(&mut agent, acked);
    assert_same_boot(&mut agent, &booted.boot_id);
    // The source VMM ends. (Its scope is not checked: in these nested containers the scope's
    // cgroup keeps a member from outside the container's pid namespace after the VMM exited,
    // so systemd inside keeps it active.)
    wait_for("the source VMM to end", RESTART, || {
        (a.sh_raw(&format!("test -e /proc/{vmm}"))
            .ok()?
            .status
            .code()
            == Some(1))
        .then_some(())
    })
    .unwrap();

    // The journal holds the structured lines of both daemons.
    let lines = journal(&storage, "storaged");
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["event"] == "flip" && l["fields"]["volume"] == "vm1-data"),
        "no flip in storaged's journal: {lines:?}"
    );
    let lines = journal(&a, "migrated");
    assert!(lines.len() > 3, "{lines:?}");

    // A clean stop of storaged; the lease table persists across its start.
    storage.sh("systemctl stop storaged").unwrap();
    stopped_cleanly(&storage, "storaged");
    storage.sh("systemctl start storaged").unwrap();
    let l = leases(&storage, "vm1-data");
    assert!(l.contains(&("host-b".into(), "primary".into())), "{l:?}");
    // The guest's I/O was held while storaged was down and goes on; every record it was told
    // is durable is intact.
    let seq = mem_advances(&mut agent, seq);
    disk_acked_past(&mut agent, acked);

    // A clean stop of the agent on b leaves the guest running; started again, it re-adopts it.
    let vmm = on_b["pid"].as_u64().unwrap();
    b.sh("systemctl stop migrated").unwrap();
    stopped_cleanly(&b, "migrated");
    mem_advances(&mut agent, seq);
    b.sh("systemctl start migrated").unwrap();
    let again = ctl(&b, "show vm1");
    assert_eq!(again["state"], "running", "{again}");
    assert_eq!(again["pid"].as_u64(), Some(vmm), "{again}");
    stop_and_verify_disk(&mut agent);

    ctl(&b, "stop vm1");
    eprintln!("done after {:?}", t0.elapsed());
    Container::shut_down_all(vec![storage, a, b]);
    eprintln!("containers shut down after {:?}", t0.elapsed());
}
