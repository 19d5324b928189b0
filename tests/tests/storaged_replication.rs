//! Cluster mode with real processes: an etcd, storaged nodes, a volume replicated on them.
//!
//! - The master is killed with SIGKILL while a lease-aware client writes; the slave takes
//!   over, the client reconnects to it and retries its in-flight writes, and every write that
//!   had been acknowledged reads back intact from the new master. Once in plaintext, once with
//!   TLS required everywhere (NBD clients on loopback too, replication in mutual TLS).
//! - With TLS, a node whose id is not its certificate's host id does not start.

use anyhow::Result;
use e2e::cluster::{verify_records, Cluster, Writers, RECORD};
use std::sync::Arc;
use std::time::Instant;
use storaged_client::nbd::FailoverClient;

const RECORDS: u64 = 1200;
const WRITERS: u64 = 8;
/// The master is killed once this many records were acknowledged.
const KILL_AFTER: u64 = 300;

/// Two nodes, a volume on both, the master killed under the writers.
async fn master_killed(tls: bool) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut c = Cluster::start(dir.path(), &["node-a", "node-b"], tls)?;
    let a = &c.node("node-a").storaged;
    a.create_volume("rv", "8M", &["--replicas", "2"])?;
    let view = c.view("node-b", "rv").await?;
    assert_eq!(view.placement.replicas, ["node-a", "node-b"]);

    let client = Arc::new(FailoverClient::connect(c.client_config("rv", "host-1")?).await?);
    // Either node may win the first election; the other is its slave.
    let first = c.view("node-a", "rv").await?;
    assert_eq!(first.insync.members, ["node-a", "node-b"], "{first:?}");
    let master = first
        .master
        .clone()
        .expect("a master once the client is connected");
    let survivor = if master == "node-a" {
        "node-b"
    } else {
        "node-a"
    };

    let writers = Writers::start(client.clone(), RECORDS, WRITERS);
    writers.wait_acked(KILL_AFTER).await?;
    let generation = client.generation().await;
    c.kill9(&master);
    let killed = Instant::now();
    let served = writers.first_ack_after_generation(generation).await?;
    eprintln!(
        "FAILOVER master {master} killed; first write acknowledged by the new master \
        {survivor} after {} ms",
        (served - killed).as_millis()
    );
    let written = writers.finish().await?;
    assert_eq!(written.len() as u64, RECORDS);
    client.flush().await?;

    let after = c.view(survivor, "rv").await?;
    assert_eq!(after.master.as_deref(), Some(survivor), "{after:?}");
    assert!(after.term > first.term, "{first:?} -> {after:?}");
    assert_eq!(after.insync.members, [survivor], "{after:?}");
    let mut through_nbd = vec![0u8; RECORDS as usize * RECORD];
    for (i, chunk) in through_nbd.chunks_mut(RECORD).enumerate() {
        chunk.copy_from_slice(&client.read((i * RECORD) as u64, RECORD).await?);
    }
    verify_records(&through_nbd, &written, "the new master (NBD)")?;
    // The new master's own file holds them too (not only its page cache via NBD).
    let file = std::fs::read(c.node(survivor).storaged.volume_file("rv"))?;
    verify_records(&file, &written, "the new master's file")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_killed_during_writes_loses_no_acknowledged_write() -> Result<()> {
    master_killed(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_required_the_master_killed_during_writes_loses_no_acknowledged_write(
) -> Result<()> {
    master_killed(true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_a_node_id_other_than_the_certificates_host_id_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut c = Cluster::start(dir.path(), &[], true)?;
    let err = c
        .add_node("node-a", &["--node-id", "node-z"])
        .err()
        .expect("storaged must not start");
    let log = std::fs::read_dir(dir.path().join("node-a"))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect::<String>();
    assert!(
        log.contains("node id node-z is not the host id of the TLS certificate (node-a)"),
        "{err:#}\n{log}"
    );
    Ok(())
}

/// How a slave is lost.
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// SIGKILL, then started again.
    Killed,
    /// SIGSTOP (it falls behind: no acks), then SIGCONT.
    Frozen,
}

/// Records in the 128 MiB volume of the resync tests.
const BIG_RECORDS: u64 = 32768;
/// Each writer's pause after a record in the resync tests, so that they outlast the resync.
const PACE: std::time::Duration = std::time::Duration::from_millis(2);

/// A slave lost under the writers: writes go on without it (it leaves the in-sync set), it
/// comes back, is resynced while the writers run and rejoins; its copy is then the master's
/// byte for byte, and it serves every acknowledged record once the master is killed.
async fn slave_lost_and_resynced(loss: Loss) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut c = Cluster::start(dir.path(), &[], false)?;
    let flags = ["--replication-timeout-ms", "1000"];
    c.add_node("node-a", &flags)?;
    c.add_node("node-b", &flags)?;
    c.node("node-a")
        .storaged
        .create_volume("rv", "128M", &["--replicas", "2"])?;
    let client = Arc::new(FailoverClient::connect(c.client_config("rv", "host-1")?).await?);
    let first = c.view("node-a", "rv").await?;
    assert_eq!(first.insync.members, ["node-a", "node-b"], "{first:?}");
    let master = first.master.clone().expect("a master");
    let slave = if master == "node-a" {
        "node-b"
    } else {
        "node-a"
    }
    .to_string();

    let writers = Writers::paced(client.clone(), BIG_RECORDS, WRITERS, PACE);
    writers.wait_acked(500).await?;
    match loss {
        Loss::Killed => c.kill9(&slave),
        Loss::Frozen => c.node(&slave).storaged.freeze(true)?,
    }
    let lost = Instant::now();
    let at_loss = writers.acked.load(std::sync::atomic::Ordering::SeqCst);
    c.wait_view(&master, "rv", "the lost slave out of the set", |v| {
        v.insync.members == [master.as_str()]
    })
    .await?;
    writers.wait_acked(at_loss + 500).await?;
    eprintln!(
        "{loss:?} slave {slave}: out of the in-sync set, writes acknowledged without it \
        {:?} after the loss",
        writers.first_ack_after(lost).await? - lost
    );
    match loss {
        Loss::Killed => c.restart(&slave)?,
        Loss::Frozen => c.node(&slave).storaged.freeze(false)?,
    }
    let back = Instant::now();
    let at_back = writers.acked.load(std::sync::atomic::Ordering::SeqCst);
    c.wait_view(&master, "rv", "the slave in the set again", |v| {
        v.insync.members.len() == 2
    })
    .await?;
    let at_rejoin = writers.acked.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!(
        "slave {slave} resynced and rejoined {:?} after it came back; {} records \
        acknowledged meanwhile",
        back.elapsed(),
        at_rejoin - at_back
    );
    assert!(
        at_rejoin > at_back,
        "writes were acknowledged during the resync"
    );
    // And with the slave counted again.
    assert!(
        at_rejoin + 200 < BIG_RECORDS,
        "the writers ran out of records before the slave rejoined"
    );
    writers.wait_acked(at_rejoin + 200).await?;
    let written = writers.stop().await?;
    client.flush().await?;

    let on_master = std::fs::read(c.node(&master).storaged.volume_file("rv"))?;
    let on_slave = std::fs::read(c.node(&slave).storaged.volume_file("rv"))?;
    assert_eq!(on_master.len(), on_slave.len());
    if let Some(at) = on_master.iter().zip(&on_slave).position(|(a, b)| a != b) {
        anyhow::bail!("the resynced copy differs from the master's at byte {at}");
    }
    verify_records(&on_slave, &written, "the resynced slave's file")?;

    // The resynced copy can take over.
    c.kill9(&master);
    let mut through_nbd = vec![0u8; BIG_RECORDS as usize * RECORD];
    for (i, chunk) in through_nbd.chunks_mut(RECORD).enumerate() {
        if written.binary_search(&(i as u64)).is_ok() {
            chunk.copy_from_slice(&client.read((i * RECORD) as u64, RECORD).await?);
        }
    }
    verify_records(&through_nbd, &written, "the resynced slave, now master")?;
    let now = c.view(&slave, "rv").await?;
    assert_eq!(now.master.as_deref(), Some(slave.as_str()), "{now:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slave_killed_during_writes_is_resynced_and_rejoins() -> Result<()> {
    slave_lost_and_resynced(Loss::Killed).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slave_that_falls_behind_leaves_the_set_and_is_resynced() -> Result<()> {
    slave_lost_and_resynced(Loss::Frozen).await
}

/// Three copies; the master killed with SIGKILL while writers run and a verifier reads back
/// acknowledged records through the same failover client: no acknowledged record is lost or
/// reads back wrong, the new master serves (the failover time, from the kill to the first
/// record acknowledged on the client's new connection, is printed), the surviving slave and
/// then the old master (started again) are resynced, and all three copies end identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn master_killed_under_a_verifying_writer_with_three_copies() -> Result<()> {
    const RECORDS: u64 = 32768;
    let dir = tempfile::tempdir()?;
    let ids = ["node-a", "node-b", "node-c"];
    let mut c = Cluster::start(dir.path(), &ids, false)?;
    c.node("node-a")
        .storaged
        .create_volume("rv", "128M", &["--replicas", "3"])?;
    let client = Arc::new(FailoverClient::connect(c.client_config("rv", "host-1")?).await?);
    let first = c.view("node-a", "rv").await?;
    assert_eq!(first.insync.members.len(), 3, "{first:?}");
    let master = first.master.clone().expect("a master");

    let writers = Writers::paced(client.clone(), RECORDS, WRITERS, PACE);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let verifier = {
        let (client, done, stop) = (client.clone(), writers.done.clone(), stop.clone());
        tokio::spawn(async move {
            let mut checked = 0u64;
            let mut k = 0usize;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                // The latest record and one further back, in turn.
                let pick = {
                    let done = done.lock().expect("done");
                    match done.len() {
                        0 => None,
                        n => Some(
                            done[if k.is_multiple_of(2) {
                                n - 1
                            } else {
                                (k * 7919) % n
                            }],
                        ),
                    }
                };
                k += 1;
                let Some(i) = pick else {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    continue;
                };
                let got = client.read(i * RECORD as u64, RECORD).await?;
                anyhow::ensure!(
                    got == e2e::cluster::record(i),
                    "acknowledged record {i} reads back wrong"
                );
                checked += 1;
            }
            anyhow::Ok(checked)
        })
    };
    writers.wait_acked(1000).await?;
    let generation = client.generation().await;
    c.kill9(&master);
    let killed = Instant::now();
    let served = writers.first_ack_after_generation(generation).await?;
    let via = ids.iter().find(|n| **n != master).expect("a survivor");
    let now = c
        .wait_view(via, "rv", "a new master", |v| {
            v.master.as_deref().is_some_and(|m| m != master)
        })
        .await?;
    let new_master = now.master.clone().expect("a new master");
    eprintln!(
        "FAILOVER master {master} killed; first write acknowledged by the new master \
        {new_master} after {} ms",
        (served - killed).as_millis()
    );
    // The surviving slave comes back into the set (resync), then the old master does.
    let other = ids
        .iter()
        .find(|n| **n != master && **n != new_master)
        .expect("a third node")
        .to_string();
    c.wait_view(&new_master, "rv", "the surviving slave resynced", |v| {
        v.insync.members.len() == 2 && v.insync.members.contains(&other)
    })
    .await?;
    c.restart(&master)?;
    c.wait_view(&new_master, "rv", "the old master resynced", |v| {
        v.insync.members.len() == 3
    })
    .await?;
    let at_rejoin = writers.acked.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        at_rejoin + 200 < RECORDS,
        "the writers ran out of records before the copies rejoined"
    );
    writers.wait_acked(at_rejoin + 200).await?;
    let written = writers.stop().await?;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let checked = verifier.await??;
    client.flush().await?;
    eprintln!(
        "{} records acknowledged, {checked} read back while writing",
        written.len()
    );

    let files: Vec<Vec<u8>> = ids
        .iter()
        .map(|n| std::fs::read(c.node(n).storaged.volume_file("rv")))
        .collect::<std::io::Result<_>>()?;
    for (n, f) in ids.iter().zip(&files) {
        verify_records(f, &written, &format!("{n}'s file"))?;
        anyhow::ensure!(*f == files[0], "{n}'s copy differs from node-a's");
    }
    Ok(())
}
