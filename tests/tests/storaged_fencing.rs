//! Fencing: a primary writing continuously, a standby, a flip. After the flip's acknowledgement
//! nothing from the old primary reaches the disk, its requests fail, it cannot reconnect, and
//! the new primary reads everything the old one had acknowledged. The old primary writes
//! through three connections with every kind of write command, and the fencing checker
//! ([`e2e::fencing`]) judges the volume.

use anyhow::{bail, ensure, Context, Result};
use e2e::fencing::{record, Writers, BLOCK};
use e2e::storaged::{client_config, Storaged, DEADLINE};
use std::time::{Duration, Instant};
use storaged_client::nbd::{Client, ClientError};
use storaged_client::protocol::RequestedState;

/// The flip over the REST API (through the CLI): its report names every step.
fn flip_over_rest(s: &Storaged) -> Result<u64> {
    let out = s.cli(&["lease", "flip", "vol", "--to", "host-b"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    for k in [
        "deactivate_us",
        "drain_us",
        "disconnect_us",
        "persist_us",
        "promote_us",
    ] {
        ensure!(v[k].is_u64(), "flip report lacks {k}: {out}");
    }
    v["epoch"].as_u64().context("epoch")
}

async fn fencing_scenario(s: &Storaged, via_api: bool) -> Result<()> {
    let primary = || client_config(s, "vol", "host-a", RequestedState::Primary);
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(Client::connect(&primary()).await?);
    }
    let a = conns[0].clone();
    let b = Client::connect(&client_config(s, "vol", "host-b", RequestedState::Standby)).await?;
    assert_eq!(a.lease(), Some((RequestedState::Primary, 1)));
    assert_eq!(b.lease(), Some((RequestedState::Standby, 1)));
    // The standby has no data access.
    assert!(matches!(
        b.read(0, 512).await,
        Err(ClientError::NotPermitted)
    ));

    let writers = Writers::start(&conns, 4, *b"AAAA", 0);
    writers.wait_acknowledged(2000, DEADLINE).await?;
    let epoch = if via_api {
        tokio::task::block_in_place(|| flip_over_rest(s))?
    } else {
        let rep = b.flip().await?;
        ensure!(rep.total_us >= rep.persist_us);
        rep.epoch
    };
    let fenced_at = Instant::now();
    assert_eq!(epoch, 2);
    let verdict = writers
        .verify(&b, fenced_at, Duration::from_secs(1))
        .await?;
    eprintln!("fencing checker: {verdict:?}");
    ensure!(
        verdict.stale_writes == 0 && verdict.acknowledged >= 2000,
        "{verdict:?}"
    );

    // The old primary's further requests fail.
    ensure!(a.write(0, record(b"AAAA", 0, 0), true).await.is_err());
    ensure!(a.read(0, 512).await.is_err());
    // It cannot come back, in either state.
    for state in [RequestedState::Primary, RequestedState::Standby] {
        match Client::connect(&client_config(s, "vol", "host-a", state)).await {
            Err(ClientError::Deactivated { message }) => {
                ensure!(message.contains("host-a"), "{message}")
            }
            other => bail!("host-a reconnected as {state:?}: {other:?}"),
        }
    }
    // The new primary owns the disk, and the raw file agrees with what it reads.
    b.write(0, record(b"BBBB", 1, 0), true).await?;
    let seen = b.read(0, 64 * BLOCK).await?;
    let raw = std::fs::read(s.volume_file("vol"))?;
    ensure!(seen[..] == raw[..64 * BLOCK], "file and NBD view differ");
    Ok(())
}

fn scenario(via_api: bool) -> Result<()> {
    let flags: &[&str] = if via_api { &[] } else { &["--flip-over-nbd"] };
    let (_dir, s) = Storaged::start_with_volume("vol", "64M", flags)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(fencing_scenario(&s, via_api))?;
    let leases = s.cli(&["lease", "list", "vol"])?;
    ensure!(leases.contains("epoch 2"), "{leases}");
    let line = |host: &str| {
        leases
            .lines()
            .find(|l| l.starts_with(host))
            .unwrap_or("")
            .to_string()
    };
    ensure!(line("host-a").contains("deactivated"), "{leases}");
    ensure!(line("host-b").contains("primary"), "{leases}");
    ensure!(
        s.log().contains("event=\"flip\"") || s.log().contains("event=flip"),
        "flip event logged"
    );
    Ok(())
}

#[test]
fn flip_over_nbd_fences_the_old_primary() -> Result<()> {
    scenario(false)
}

#[test]
fn flip_over_rest_fences_the_old_primary() -> Result<()> {
    scenario(true)
}

/// The checker can fail: writers that were never fenced are caught writing after the "fence".
#[test]
fn the_checker_catches_writes_after_the_fence() -> Result<()> {
    let (_dir, s) = Storaged::start_with_volume("vol", "64M", &[])?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let a =
            Client::connect(&client_config(&s, "vol", "host-a", RequestedState::Primary)).await?;
        let writers = Writers::start(std::slice::from_ref(&a), 2, *b"AAAA", 0);
        writers.wait_acknowledged(100, DEADLINE).await?;
        let err = writers
            .verify(&a, Instant::now(), Duration::from_secs(1))
            .await
            .expect_err("unfenced writers must fail the check");
        ensure!(
            err.to_string().contains("landed after the fence"),
            "{err:#}"
        );
        Ok(())
    })
}
