//! Cluster mode against etcd failures, with real processes (Debian's etcd 3.4, storaged nodes)
//! and a volume replicated on two nodes:
//!
//! - one etcd member of three lost (each in turn, killed and started again) changes nothing:
//!   the master keeps its term, writes go on, a flip succeeds, every acknowledged record is on
//!   both copies;
//! - two of three lost (no quorum): the master stops acknowledging once its etcd lease may have
//!   expired, a flip and a lease query are refused with an answer that says etcd is
//!   unavailable (the query after at most a lease TTL, not etcd's own timeout), and once the
//!   quorum is back service resumes (no restart of storaged) with every acknowledged record;
//! - the master cut off from etcd (network namespaces, a prohibit route): it stops
//!   acknowledging before the slave is elected, writes sent to it afterwards are refused and
//!   land on no copy, every acknowledged record is on both copies once it is back;
//! - a master SIGKILLed in the middle of a flip (`VMHOP_CRASH_AT`), before or after its etcd
//!   transaction: one primary afterwards, the same lease table on every node, and the caller
//!   learns from any node's lease table whether the flip happened.

use anyhow::{Context, Result};
use e2e::cluster::{verify_records, Cluster, Writers, RECORD};
use e2e::etcd::Etcd;
use e2e::process::wait_for_async;
use std::sync::Arc;
use std::time::{Duration, Instant};
use storaged_client::api::{LeaseState, LeaseView};
use storaged_client::nbd::{FailoverClient, LeaseSpec};
use storaged_client::protocol::RequestedState;
use storaged_client::rest::StoragedApi;

const DEADLINE: Duration = Duration::from_secs(60);
/// Records of the 16 MiB volume.
const RECORDS: u64 = 4096;
/// Records the writers of the cut test write (the rest of the volume is free).
const WRITTEN: u64 = 3000;
/// Records sent to a master cut off from etcd, after its successor was elected.
const LATE: std::ops::Range<u64> = 4000..4010;
/// Each writer's pause after a record, so that the writers outlast the etcd failures.
const PACE: Duration = Duration::from_millis(10);

/// The other node of a two-node cluster.
fn other(node: &str) -> &'static str {
    if node == "node-a" {
        "node-b"
    } else {
        "node-a"
    }
}

/// A three-member etcd, nodes `node-a` and `node-b`, volume `rv` on both, its first master
/// serving; returns the cluster and the master.
async fn three_member_cluster(dir: &std::path::Path) -> Result<(Cluster, String)> {
    let etcd = Etcd::start_members(dir, 3, "127.0.0.1", None)?;
    let c = Cluster::start_on(etcd, dir, &["node-a", "node-b"], false)?;
    c.node("node-a")
        .storaged
        .create_volume("rv", "16M", &["--replicas", "2"])?;
    let master = serving_master(&c, "node-a").await?;
    Ok((c, master))
}

/// Waits until node `via` shows a master of `rv` in the view and that master serves; returns
/// it.
async fn serving_master(c: &Cluster, via: &str) -> Result<String> {
    let v = c
        .wait_view(via, "rv", "a master", |v| v.master.is_some())
        .await?;
    let master = v.master.expect("a master");
    c.wait_view(&master, "rv", "the master serving", |v| {
        v.role_here.as_deref() == Some("master")
    })
    .await?;
    Ok(master)
}

/// The primary client of `host` and the standby client of `standby`, both following the
/// master across nodes.
async fn clients(
    c: &Cluster,
    host: &str,
    standby: &str,
) -> Result<(Arc<FailoverClient>, FailoverClient)> {
    let primary = Arc::new(FailoverClient::connect(c.client_config("rv", host)?).await?);
    let mut cfg = c.client_config("rv", standby)?;
    cfg.lease = Some(LeaseSpec {
        host: standby.into(),
        instance: format!("{standby}-vm"),
        state: RequestedState::Standby,
        expected_epoch: 0,
    });
    Ok((primary, FailoverClient::connect(cfg).await?))
}

/// The lease table as node `via` answers it.
async fn leases(c: &Cluster, via: &str) -> Result<LeaseView> {
    let api = StoragedApi::new(&c.node(via).storaged.api.to_string(), None);
    Ok(api.leases("rv").await?)
}

/// The REST API of node `via`.
fn api(c: &Cluster, via: &str) -> StoragedApi {
    StoragedApi::new(&c.node(via).storaged.api.to_string(), None)
}

/// The nodes' warnings, for a failure's message.
fn warnings(c: &Cluster) -> String {
    let mut out = String::new();
    for n in ["node-a", "node-b"] {
        for l in c.node(n).storaged.log().lines() {
            if l.contains("WARN") || l.contains("ERROR") {
                out.push_str(&format!("{n}: {l}\n"));
            }
        }
    }
    out
}

/// Checks that both nodes' files hold every record of `written`.
fn verify_copies(c: &Cluster, written: &[u64]) -> Result<()> {
    for n in ["node-a", "node-b"] {
        let file = std::fs::read(c.node(n).storaged.volume_file("rv"))?;
        verify_records(&file, written, &format!("{n}'s copy"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_one_etcd_member_of_three_changes_nothing() -> Result<()> {
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let (mut c, master) = three_member_cluster(dir.path()).await?;
    let (primary, standby) = clients(&c, "host-1", "host-2").await?;
    let first = c.view(&master, "rv").await?;
    let writers = Writers::paced(primary.clone(), RECORDS, 4, PACE);
    writers.wait_acked(100).await?;
    // Each member in turn: whichever one is etcd's leader, or the one a node's lease
    // keep-alive stream goes to, is among them.
    for i in 0..c.etcd.len() {
        c.etcd.kill(i);
        let before = writers.acked.load(std::sync::atomic::Ordering::SeqCst);
        writers.wait_acked(before + 200).await?;
        let now = c.view(other(&master), "rv").await?;
        assert_eq!(
            (now.master.as_deref(), now.term),
            (Some(master.as_str()), first.term),
            "etcd member m{i} down: the master changed ({first:?} -> {now:?})\n{}",
            warnings(&c)
        );
        if i == c.etcd.len() - 1 {
            // A flip, with this member still down.
            let written = writers.stop().await?;
            primary.flush().await?;
            let report = api(&c, &master).flip_to("rv", "host-2").await?;
            eprintln!("flip with etcd member m{i} down: {report:?}");
            standby.write(0, &e2e::cluster::record(0), false).await?;
            let v = leases(&c, other(&master)).await?;
            assert_eq!(v.state_of("host-2"), Some(LeaseState::Primary), "{v:?}");
            assert_eq!(v.state_of("host-1"), Some(LeaseState::Deactivated), "{v:?}");
            standby.flush().await?;
            verify_copies(&c, &written)?;
            c.etcd.restart(i)?;
            break;
        }
        c.etcd.restart(i)?;
    }
    let last = c.view(&master, "rv").await?;
    assert_eq!(last.term, first.term, "{first:?} -> {last:?}");
    assert_eq!(last.insync.members.len(), 2, "{last:?}");
    for n in ["node-a", "node-b"] {
        assert!(
            !c.node(n).storaged.log().contains("session-lost"),
            "{n} lost its etcd session:\n{}",
            c.node(n).storaged.log()
        );
    }
    eprintln!("TIME one member lost: {} ms", started.elapsed().as_millis());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_quorum_the_master_stops_and_service_resumes_after() -> Result<()> {
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let (mut c, master) = three_member_cluster(dir.path()).await?;
    let (primary, _standby) = clients(&c, "host-1", "host-2").await?;
    let writers = Writers::paced(primary.clone(), RECORDS, 4, PACE);
    writers.wait_acked(100).await?;
    let epoch = leases(&c, &master).await?.epoch;

    c.etcd.kill(1);
    c.etcd.kill(2);
    // The master cannot renew its etcd lease: it ends its mastership (and disconnects its
    // clients) once the lease may have expired at etcd.
    let m = &c.node(&master).storaged;
    wait_for_async("the master to give up", DEADLINE, || async {
        m.log().contains("event=\"deposed\"").then_some(())
    })
    .await
    .with_context(|| m.log())?;
    let stopped_at = writers.acked.load(std::sync::atomic::Ordering::SeqCst);
    for n in ["node-a", "node-b"] {
        let s = &c.node(n).storaged;
        wait_for_async("each node to lose its etcd session", DEADLINE, || async {
            s.log().contains("session-lost").then_some(())
        })
        .await?;
    }

    // A flip is refused, on either node, with an answer that says why.
    for via in [master.as_str(), other(&master)] {
        let refused = api(&c, via)
            .flip_to("rv", "host-2")
            .await
            .err()
            .with_context(|| format!("a flip through {via} succeeded without etcd quorum"))?;
        let text = format!("{refused:#}");
        eprintln!("flip through {via} without etcd quorum: {text}");
        assert_eq!(refused.status().map(|s| s.as_u16()), Some(503), "{text}");
        assert!(text.contains("etcd is unavailable"), "{text}");
    }
    // A lease query reads the table from etcd on a node that is not the master: it answers
    // nonetheless, saying why it cannot (it waits no longer than the lease TTL for etcd).
    for via in ["node-a", "node-b"] {
        let asked = Instant::now();
        let answer = tokio::time::timeout(DEADLINE, api(&c, via).leases("rv"))
            .await
            .with_context(|| {
                format!("a lease query through {via} got no answer without etcd quorum")
            })?;
        let refused = answer
            .err()
            .with_context(|| format!("a lease query through {via} read etcd without its quorum"))?;
        let text = format!("{refused:#}");
        eprintln!(
            "lease query through {via} without etcd quorum, after {:?}: {text}",
            asked.elapsed()
        );
        assert_eq!(refused.status().map(|s| s.as_u16()), Some(503), "{text}");
        assert!(
            text.contains("etcd is unavailable") && text.contains("cannot be read"),
            "{text}"
        );
    }
    // No write was acknowledged since the master gave up (the writers wait, reconnecting).
    assert_eq!(
        writers.acked.load(std::sync::atomic::Ordering::SeqCst),
        stopped_at,
        "a write was acknowledged without etcd quorum"
    );

    // The quorum comes back: the same processes serve again.
    c.etcd.restart(1)?;
    let resumed = Instant::now();
    writers.wait_acked(stopped_at + 100).await?;
    eprintln!(
        "QUORUM back; writes acknowledged again after {} ms",
        resumed.elapsed().as_millis()
    );
    let written = writers.stop().await?;
    primary.flush().await?;
    let master = serving_master(&c, "node-a").await?;
    let report = api(&c, &master).flip_to("rv", "host-2").await?;
    let v = leases(&c, other(&master)).await?;
    assert_eq!(v.epoch, epoch + 1, "{report:?} {v:?}");
    assert_eq!(v.state_of("host-2"), Some(LeaseState::Primary), "{v:?}");
    let file = std::fs::read(c.node(&master).storaged.volume_file("rv"))?;
    verify_records(&file, &written, "the master's copy")?;
    eprintln!("TIME quorum lost: {} ms", started.elapsed().as_millis());
    Ok(())
}

/// The master is SIGKILLed at fault point `point` of a flip from host-1 to host-2 (either node
/// may be master: both are armed). `made` tells whether the flip's etcd transaction came before
/// the point. The caller of the flip gets no answer; it learns the outcome from the lease table
/// of whichever node it asks, and exactly one host can write afterwards.
async fn master_killed_mid_flip(point: &str, made: bool) -> Result<()> {
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let mut c = Cluster::pair_with_env(dir.path(), &[("VMHOP_CRASH_AT", point)], "16M")?;
    let master = serving_master(&c, "node-a").await?;
    let survivor = other(&master);
    let (primary, standby) = clients(&c, "host-1", "host-2").await?;
    primary.write(0, &e2e::cluster::record(0), false).await?;
    primary.flush().await?;
    let before = leases(&c, &master).await?;

    let lost = api(&c, &master)
        .flip_to("rv", "host-2")
        .await
        .err()
        .context("the flip was answered although the master was to die")?;
    assert_eq!(lost.status(), None, "an answer came: {lost:#}");
    let m = c.node_mut(&master);
    e2e::process::wait_for("the master to die", DEADLINE, || {
        (!m.storaged.is_running()).then_some(())
    })?;
    assert!(
        c.node(&master)
            .storaged
            .log()
            .contains("fault point reached"),
        "the master died elsewhere than at {point}"
    );
    c.wait_view(survivor, "rv", "the survivor elected", |v| {
        v.master.as_deref() == Some(survivor) && v.role_here.as_deref() == Some("master")
    })
    .await?;

    // What the caller of the flip reads, from the survivor.
    let after = leases(&c, survivor).await?;
    let (winner, loser) = if made {
        assert_eq!(after.epoch, before.epoch + 1, "{after:?}");
        ("host-2", "host-1")
    } else {
        assert_eq!(after.epoch, before.epoch, "{after:?}");
        ("host-1", "host-2")
    };
    let primaries: Vec<_> = after
        .leases
        .iter()
        .filter(|l| l.state == LeaseState::Primary)
        .collect();
    assert_eq!(primaries.len(), 1, "{after:?}");
    assert_eq!(primaries[0].host, winner, "{after:?}");
    // The crashed node, started again without the fault point, answers the same table.
    c.restart(&master)?;
    c.wait_view(&master, "rv", "the restarted node back", |v| {
        v.role_here.as_deref() == Some("not-master")
    })
    .await?;
    let again = leases(&c, &master).await?;
    assert_eq!(
        (again.epoch, again.state_of(winner), again.state_of(loser)),
        (
            after.epoch,
            Some(LeaseState::Primary),
            after.state_of(loser)
        ),
        "{again:?} / {after:?}"
    );

    // Exactly the winner writes.
    let (win, lose) = if made {
        (&standby, primary.as_ref())
    } else {
        (primary.as_ref(), &standby)
    };
    win.write(RECORD as u64, &e2e::cluster::record(1), false)
        .await?;
    let refused = lose
        .write(2 * RECORD as u64, &e2e::cluster::record(2), false)
        .await
        .err()
        .with_context(|| format!("{loser} wrote as well as {winner}"))?;
    eprintln!("{loser} refused after the crash: {refused}");
    let data = win.read(0, 3 * RECORD).await?;
    verify_records(&data, &[0, 1], "the winner's view")?;
    assert_ne!(
        &data[2 * RECORD..],
        &e2e::cluster::record(2)[..],
        "{loser}'s write landed"
    );
    if !made {
        // Not made: the flip can be asked again, of the next master (the survivor is armed as
        // well: it makes way for the node started again without the fault point).
        c.kill9(survivor);
        c.restart(survivor)?;
        let now = serving_master(&c, &master).await?;
        let report = api(&c, &now).flip_to("rv", "host-2").await?;
        let v = leases(&c, &master).await?;
        assert_eq!(v.epoch, before.epoch + 1, "{report:?} {v:?}");
        assert_eq!(v.state_of("host-2"), Some(LeaseState::Primary), "{v:?}");
    }
    eprintln!(
        "TIME master killed at {point}: {} ms",
        started.elapsed().as_millis()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_killed_before_the_flip_reached_etcd_the_flip_did_not_happen() -> Result<()> {
    master_killed_mid_flip("cluster.lease.flip", false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_killed_after_the_flip_reached_etcd_the_flip_happened() -> Result<()> {
    master_killed_mid_flip("flip.persist", true).await
}

/// The timestamp (RFC 3339, UTC, fixed width: ordered as text) of the last line of `log` that
/// contains `needle`.
fn logged_at(log: &str, needle: &str) -> Option<String> {
    let line = log.lines().rev().find(|l| l.contains(needle))?;
    line.split_whitespace().next().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_cut_off_from_etcd_stops_before_a_slave_is_elected() -> Result<()> {
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    // etcd and each node on a test host of their own; the test reaches them all.
    let mut rig = e2e::netns::Rig::new(&["etcd", "a", "b"])?;
    rig.reach_from_here()?;
    let etcd_host = rig.host("etcd").clone();
    let ip = etcd_host.addr.to_string();
    let etcd = Etcd::start_members(dir.path(), 1, &ip, Some(&etcd_host.netns))?;
    let mut c = Cluster::start_on(etcd, dir.path(), &[], false)?;
    c.add_node_in("node-a", rig.host("a"))?;
    c.add_node_in("node-b", rig.host("b"))?;
    c.node("node-a")
        .storaged
        .create_volume("rv", "16M", &["--replicas", "2"])?;
    let master = serving_master(&c, "node-a").await?;
    let slave = other(&master);
    let home = |n: &str| rig.host(if n == "node-a" { "a" } else { "b" }).clone();
    let first = c.view(slave, "rv").await?;
    let primary = Arc::new(FailoverClient::connect(c.client_config("rv", "host-1")?).await?);
    // The connection to the master, used without failover for the writes sent after the cut.
    let direct = primary.current().await;
    let writers = Writers::paced(primary.clone(), WRITTEN, 4, PACE);
    writers.wait_acked(100).await?;

    home(&master).cut(&etcd_host)?;
    let cut = Instant::now();
    let m = &c.node(&master).storaged;
    wait_for_async("the master cut off to give up", DEADLINE, || async {
        m.log().contains("event=\"deposed\"").then_some(())
    })
    .await?;
    eprintln!(
        "CUT the master stopped acknowledging {} ms after the cut",
        cut.elapsed().as_millis()
    );
    let v = c
        .wait_view(slave, "rv", "the slave elected", |v| {
            v.master.as_deref() == Some(slave) && v.role_here.as_deref() == Some("master")
        })
        .await?;
    assert!(v.term > first.term, "{first:?} -> {v:?}");
    eprintln!(
        "CUT the slave serves as master {} ms after the cut",
        cut.elapsed().as_millis()
    );
    // The old master gave up before the new one was elected (one clock: the same machine).
    let gave_up = logged_at(&m.log(), "event=\"deposed\"").context("deposed line")?;
    let s = &c.node(slave).storaged;
    let elected = logged_at(&s.log(), "event=\"master\"").context("master line")?;
    assert!(
        gave_up < elected,
        "deposed at {gave_up}, successor at {elected}"
    );

    // Writes sent to the old master now are refused (an error, not a silent loss), on its
    // open connection and on a new one.
    for i in LATE {
        let r = direct
            .write(i * RECORD as u64, e2e::cluster::record(i), false)
            .await;
        assert!(r.is_err(), "the old master acknowledged record {i}");
    }
    let mut cfg = c.client_config("rv", "host-1")?;
    cfg.addresses = vec![m.nbd.to_string()];
    cfg.rounds = 1;
    let refused = storaged_client::nbd::Client::connect(&cfg)
        .await
        .err()
        .context("the old master took a new client")?;
    eprintln!("a new client of the old master: {refused}");

    // The writers went on through the new master.
    let now = writers.acked.load(std::sync::atomic::Ordering::SeqCst);
    writers.wait_acked(now + 100).await?;
    let written = writers.stop().await?;
    primary.flush().await?;

    // Healed, the old master comes back as a slave and is resynced.
    home(&master).heal(&etcd_host)?;
    c.wait_view(slave, "rv", "the old master back in sync", |v| {
        v.insync.members.len() == 2 && v.master.as_deref() == Some(slave)
    })
    .await?;
    verify_copies(&c, &written)?;
    for n in [master.as_str(), slave] {
        let file = std::fs::read(c.node(n).storaged.volume_file("rv"))?;
        for i in LATE {
            let at = i as usize * RECORD;
            assert_ne!(
                &file[at..at + RECORD],
                &e2e::cluster::record(i)[..],
                "late record {i} on {n}'s copy"
            );
        }
    }
    eprintln!("TIME master cut off: {} ms", started.elapsed().as_millis());
    Ok(())
}
