//! Cluster mode with real processes: an etcd, two storaged nodes, a volume replicated on both.
//! The master is killed with SIGKILL while a lease-aware client writes; the slave takes over,
//! the client reconnects to it and retries its in-flight writes, and every write that had been
//! acknowledged reads back intact from the new master.

use anyhow::{Context, Result};
use e2e::etcd::Etcd;
use e2e::storaged::Storaged;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use storaged_client::nbd::{ClientConfig, FailoverClient, LeaseSpec};
use storaged_client::protocol::RequestedState;
use storaged_client::rest::StoragedApi;

const RECORD: usize = 4096;
const RECORDS: u64 = 1200;
const WRITERS: u64 = 8;
/// The master is killed once this many records were acknowledged.
const KILL_AFTER: u64 = 300;

fn node(dir: &std::path::Path, id: &str, etcd: &Etcd) -> Result<Storaged> {
    let work = dir.join(id);
    std::fs::create_dir_all(&work)?;
    Storaged::start_with(
        &work,
        &[
            "--etcd",
            &etcd.endpoint,
            "--node-id",
            id,
            "--repl-listen",
            "127.0.0.1:0",
            "--etcd-lease-ttl-secs",
            "2",
        ],
    )
}

/// Record `i`: its index in the first 8 bytes, then a byte derived from it.
fn record(i: u64) -> Vec<u8> {
    let mut r = vec![(i % 251) as u8 ^ 0x5a; RECORD];
    r[..8].copy_from_slice(&i.to_be_bytes());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_killed_during_writes_loses_no_acknowledged_write() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::start(dir.path())?;
    let mut a = node(dir.path(), "node-a", &etcd)?;
    let b = node(dir.path(), "node-b", &etcd)?;
    a.create_volume("rv", "8M", &["--replicas", "2"])?;
    let api = StoragedApi::new(&b.api.to_string(), None);
    let view = api.replicated_volume("rv").await?;
    assert_eq!(view.placement.replicas, ["node-a", "node-b"]);

    let mut cfg = ClientConfig::new(vec![a.nbd.to_string(), b.nbd.to_string()], "rv")
        .with_lease(LeaseSpec {
            host: "host-1".into(),
            instance: "vm-1".into(),
            state: RequestedState::Primary,
            expected_epoch: 0,
        });
    cfg.rounds = 200;
    cfg.backoff_initial = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(250);
    cfg.connect_timeout = Duration::from_secs(2);
    let client = Arc::new(FailoverClient::connect(cfg).await?);
    let first = api.replicated_volume("rv").await?;
    assert_eq!(first.master.as_deref(), Some("node-a"), "{first:?}");
    assert_eq!(first.insync.members, ["node-a", "node-b"], "{first:?}");

    let acked = Arc::new(AtomicU64::new(0));
    let halfway = Arc::new(tokio::sync::Notify::new());
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (client, acked, halfway) = (client.clone(), acked.clone(), halfway.clone());
        writers.push(tokio::spawn(async move {
            let mut i = w;
            while i < RECORDS {
                client
                    .write(i * RECORD as u64, &record(i), false)
                    .await
                    .with_context(|| format!("record {i}"))?;
                if acked.fetch_add(1, Ordering::SeqCst) + 1 == KILL_AFTER {
                    halfway.notify_one();
                }
                i += WRITERS;
            }
            anyhow::Ok(())
        }));
    }
    // Kill the master while the writers run.
    halfway.notified().await;
    a.kill9();
    let killed_at = acked.load(Ordering::SeqCst);
    for w in writers {
        w.await??;
    }
    assert!(killed_at < RECORDS, "the kill came after the last write");
    client.flush().await?;

    let after = api.replicated_volume("rv").await?;
    assert_eq!(after.master.as_deref(), Some("node-b"), "{after:?}");
    assert!(after.term > first.term, "{first:?} -> {after:?}");
    assert_eq!(after.insync.members, ["node-b"], "{after:?}");
    for i in 0..RECORDS {
        let got = client.read(i * RECORD as u64, RECORD).await?;
        assert!(got == record(i), "record {i} differs after the failover");
    }
    // The new master's own file holds them too (not only its page cache via NBD).
    let file = std::fs::read(b.volume_file("rv"))?;
    for i in 0..RECORDS {
        let at = (i as usize) * RECORD;
        assert!(file[at..at + RECORD] == record(i), "record {i} on node-b's disk");
    }
    Ok(())
}
