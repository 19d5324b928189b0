//! The failover part of `scripts/bench storaged`: how long a replicated volume cannot take
//! writes when its master dies. A storaged cluster on loopback (one etcd member, two nodes,
//! a volume with two copies), a lease-aware client with writers of 4 KiB records that never
//! stop; each round kills the volume's master with SIGKILL and measures the time from the kill
//! to the first write acknowledged by the new master (on the client's next connection), then
//! starts the killed node again and waits until it is back in the in-sync set.
//!
//! The failover time is bounded below by the nodes' etcd lease TTL
//! ([`e2e::cluster::LEASE_TTL_SECS`]): a slave may take over only once the dead master's
//! mastership has ended.
//!
//! Environment: KILLS (rounds, default 10). Prints one JSON object: the samples (ms) and their
//! p50, p99 (nearest rank) and max.

use anyhow::{Context, Result};
use e2e::cluster::{Cluster, Writers};
use e2e::stats::percentile;
use std::sync::Arc;
use std::time::Instant;
use storaged_client::nbd::FailoverClient;

/// The volume's size; the writers rewrite its first records each round.
const SIZE: &str = "16M";
/// Records each round's writers write at most.
const RECORDS: u64 = 4096;
/// Concurrent writers.
const WRITERS: u64 = 4;

fn main() -> Result<()> {
    let kills: usize = std::env::var("KILLS")
        .ok()
        .map(|v| v.parse().context("KILLS"))
        .transpose()?
        .unwrap_or(10);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let samples = rt.block_on(run(kills))?;
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let out = serde_json::json!({
        "kills": kills,
        "samples_ms": samples,
        "p50_ms": percentile(&sorted, 0.5),
        "p99_ms": percentile(&sorted, 0.99),
        "max_ms": sorted.last(),
    });
    println!("{out}");
    Ok(())
}

async fn run(kills: usize) -> Result<Vec<f64>> {
    let dir = tempfile::tempdir()?;
    let mut c = Cluster::start(dir.path(), &["node-a", "node-b"], false)?;
    let (mut master, _) = c.create_replicated("node-a", "fv", SIZE, 2).await?;
    let client = Arc::new(FailoverClient::connect(c.client_config("fv", "bench")?).await?);
    let mut samples = Vec::with_capacity(kills);
    for round in 0..kills {
        let writers = Writers::start(client.clone(), RECORDS, WRITERS);
        writers.wait_acked(64).await?;
        let generation = client.generation().await;
        c.kill9(&master);
        let killed = Instant::now();
        let served = writers.first_ack_after_generation(generation).await?;
        let ms = (served - killed).as_secs_f64() * 1e3;
        eprintln!(
            "bench failover: round {round}: master {master} killed, writes again after {ms:.0} ms"
        );
        samples.push(ms);
        writers.stop().await?;
        // The killed node comes back as a slave and is copied back into the in-sync set.
        c.restart(&master)?;
        let dead = master.clone();
        let v = c
            .wait_view(&dead, "fv", "both copies in sync", |v| {
                v.insync.members.len() == 2 && v.master.as_ref().is_some_and(|m| *m != dead)
            })
            .await?;
        master = v.master.context("a master")?;
    }
    Ok(samples)
}
