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
    c.kill9(&master);
    let killed = Instant::now();
    let first_after = writers.first_ack_after(killed).await?;
    eprintln!(
        "failover: master {master} killed, first write acknowledged by {survivor} after {:?}",
        first_after - killed
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
