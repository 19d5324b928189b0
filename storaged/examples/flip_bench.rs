//! Flip latency: two holders hand a volume back and forth N times through the NBD-level flip.
//!
//! `flip_bench NBD_ADDR API_ADDR VOLUME [N]` (the volume must exist and have no leases).
//! Each round: the standby sends `NBD_CMD_LEASE_FLIP` and waits for the acknowledgement (which
//! includes the durable write of the lease table); then the deposed host's lease is revoked so
//! that it can come back as the next standby. Prints percentiles of the client-observed flip
//! latency and of the server-reported steps as one JSON object. With `FLIP_SAMPLES=FILE` it
//! also writes every client-observed latency (microseconds, one a line) to FILE, for the CDF
//! chart of `scripts/bench storaged`.

use anyhow::{bail, Context, Result};
use std::time::Instant;
use storaged_client::api::RevokeRequest;
use storaged_client::nbd::{Client, ClientConfig, LeaseSpec};
use storaged_client::protocol::RequestedState;
use storaged_client::rest::StoragedApi;

fn cfg(nbd: &str, vol: &str, host: &str, state: RequestedState) -> ClientConfig {
    ClientConfig::new(vec![nbd.to_string()], vol).with_lease(LeaseSpec {
        host: host.into(),
        instance: format!("{host}-vm"),
        state,
        expected_epoch: 0,
    })
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        bail!("usage: flip_bench NBD_ADDR API_ADDR VOLUME [N]");
    }
    let (nbd, api, vol) = (&args[1], StoragedApi::new(&args[2], None), &args[3]);
    let n: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let hosts = ["bench-a", "bench-b"];
    let mut primary = Client::connect(&cfg(nbd, vol, hosts[0], RequestedState::Primary)).await?;
    let mut standby = Client::connect(&cfg(nbd, vol, hosts[1], RequestedState::Standby)).await?;
    let (mut p, mut s) = (0usize, 1usize);
    let (mut client_us, mut total, mut persist, mut drain) = (vec![], vec![], vec![], vec![]);
    for _ in 0..n {
        primary.write(0, vec![1u8; 4096], false).await?;
        let t = Instant::now();
        let rep = standby.flip().await.context("flip")?;
        client_us.push(t.elapsed().as_micros() as u64);
        total.push(rep.total_us);
        persist.push(rep.persist_us);
        drain.push(rep.drain_us + rep.disconnect_us);
        api.revoke(
            vol,
            &RevokeRequest {
                host: hosts[p].into(),
                only_if: None,
            },
        )
        .await?;
        let next = Client::connect(&cfg(nbd, vol, hosts[p], RequestedState::Standby)).await?;
        primary = std::mem::replace(&mut standby, next);
        std::mem::swap(&mut p, &mut s);
    }
    if let Ok(path) = std::env::var("FLIP_SAMPLES") {
        let lines: String = client_us.iter().map(|us| format!("{us}\n")).collect();
        std::fs::write(&path, lines).with_context(|| format!("write {path}"))?;
    }
    let out = serde_json::json!({
        "flips": n,
        "client_p50_us": pct(&mut client_us, 0.50),
        "client_p99_us": pct(&mut client_us, 0.99),
        "client_max_us": pct(&mut client_us, 1.0),
        "server_total_p50_us": pct(&mut total, 0.50),
        "server_total_p99_us": pct(&mut total, 0.99),
        "persist_p50_us": pct(&mut persist, 0.50),
        "persist_p99_us": pct(&mut persist, 0.99),
        "drain_disconnect_p50_us": pct(&mut drain, 0.50),
        "drain_disconnect_p99_us": pct(&mut drain, 0.99),
    });
    println!("{out}");
    Ok(())
}
