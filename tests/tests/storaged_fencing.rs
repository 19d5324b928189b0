//! Fencing: a primary writing continuously, a standby, a flip. After the flip's acknowledgement
//! nothing from the old primary reaches the disk, its requests fail, it cannot reconnect, and
//! the new primary reads everything the old one had acknowledged.

use anyhow::{bail, ensure, Context, Result};
use e2e::process::wait_for;
use e2e::storaged::{client_config, Storaged, DEADLINE};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use storaged_client::nbd::{Client, ClientError};
use storaged_client::protocol::RequestedState;

const BLOCK: usize = 4096;
/// Slots available to the records (volume of 256 MiB).
const SLOTS: u64 = 65536;
const WRITERS: usize = 16;

fn record(tag: &[u8; 4], seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[..4].copy_from_slice(tag);
    b[4..8].copy_from_slice(b"REC1");
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    for (i, x) in b[16..].iter_mut().enumerate() {
        *x = (seq as usize * 31 + i) as u8;
    }
    b
}

/// The tag and sequence of a block, if it is a well-formed record.
fn parse(block: &[u8]) -> Option<([u8; 4], u64)> {
    if &block[4..8] != b"REC1" {
        return None;
    }
    let seq = u64::from_le_bytes(block[8..16].try_into().ok()?);
    let tag: [u8; 4] = block[..4].try_into().ok()?;
    (record(&tag, seq) == block).then_some((tag, seq))
}

struct Writers {
    acked: Arc<Mutex<BTreeSet<u64>>>,
    errors: Arc<Mutex<Vec<String>>>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

/// Starts `WRITERS` tasks writing "A" records to consecutive slots until a request fails.
fn start_writers(a: &Client) -> Writers {
    let next = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let handles = (0..WRITERS)
        .map(|_| {
            let (a, next, acked, errors) = (a.clone(), next.clone(), acked.clone(), errors.clone());
            tokio::spawn(async move {
                loop {
                    let seq = next.fetch_add(1, Ordering::SeqCst);
                    if seq >= SLOTS {
                        errors.lock().unwrap().push("ran out of slots".into());
                        return;
                    }
                    match a
                        .write(seq * BLOCK as u64, record(b"AAAA", seq), false)
                        .await
                    {
                        Ok(()) => {
                            acked.lock().unwrap().insert(seq);
                        }
                        Err(e) => {
                            errors.lock().unwrap().push(e.to_string());
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    Writers {
        acked,
        errors,
        handles,
    }
}

async fn read_all(c: &Client) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(SLOTS as usize * BLOCK);
    let chunk = 4 << 20;
    let mut off = 0u64;
    while off < SLOTS * BLOCK as u64 {
        out.extend(c.read(off, chunk).await?);
        off += chunk as u64;
    }
    Ok(out)
}

async fn fencing_scenario(s: &Storaged, via_api: bool) -> Result<()> {
    let a = Client::connect(&client_config(s, "vol", "host-a", RequestedState::Primary)).await?;
    let b = Client::connect(&client_config(s, "vol", "host-b", RequestedState::Standby)).await?;
    assert_eq!(a.lease(), Some((RequestedState::Primary, 1)));
    assert_eq!(b.lease(), Some((RequestedState::Standby, 1)));
    // The standby has no data access.
    assert!(matches!(
        b.read(0, 512).await,
        Err(ClientError::NotPermitted)
    ));

    let w = start_writers(&a);
    let acked = w.acked.clone();
    tokio::task::spawn_blocking(move || {
        wait_for("A to have 500 acknowledged records", DEADLINE, || {
            (acked.lock().unwrap().len() >= 500).then_some(())
        })
    })
    .await??;

    let epoch = if via_api {
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
        v["epoch"].as_u64().context("epoch")?
    } else {
        let rep = b.flip().await?;
        ensure!(rep.total_us >= rep.persist_us);
        rep.epoch
    };
    assert_eq!(epoch, 2);
    // Acknowledged before the flip's acknowledgement: these must all be readable by B.
    let acked_at_flip: BTreeSet<u64> = w.acked.lock().unwrap().clone();
    let seen = read_all(&b).await?;
    let mut present = BTreeSet::new();
    for (slot, block) in seen.chunks(BLOCK).enumerate() {
        if let Some((tag, seq)) = parse(block) {
            ensure!(
                &tag == b"AAAA" && seq == slot as u64,
                "slot {slot} holds {tag:?}/{seq}"
            );
            present.insert(seq);
        } else {
            ensure!(
                block.iter().all(|&x| x == 0),
                "slot {slot} holds a torn record"
            );
        }
    }
    let missing: Vec<_> = acked_at_flip.difference(&present).take(5).collect();
    ensure!(
        missing.is_empty(),
        "acknowledged records missing after the flip: {missing:?}"
    );

    // B now owns the disk: it stamps every slot, then A's writers must all have failed.
    let mut stamps = Vec::new();
    for slot in 0..SLOTS / 64 {
        let b = b.clone();
        stamps.push(tokio::spawn(async move {
            let mut buf = Vec::with_capacity(64 * BLOCK);
            for s in slot * 64..slot * 64 + 64 {
                buf.extend(record(b"BBBB", s));
            }
            b.write(slot * 64 * BLOCK as u64, buf, false).await
        }));
    }
    for st in stamps {
        st.await??;
    }
    b.flush().await?;
    for h in w.handles {
        h.await?;
    }
    let errors = w.errors.lock().unwrap().clone();
    ensure!(
        errors.len() == WRITERS,
        "every writer stops with an error: {errors:?}"
    );
    ensure!(
        !errors.iter().any(|e| e.contains("slots")),
        "writers were not stopped by the flip"
    );
    // The old primary's further requests fail.
    ensure!(a.write(0, record(b"AAAA", 0), true).await.is_err());
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
    // On disk (through B and through the raw file): only B's stamps, no late A record.
    let after = read_all(&b).await?;
    let raw = std::fs::read(s.volume_file("vol"))?;
    for (slot, (blk, rawblk)) in after.chunks(BLOCK).zip(raw.chunks(BLOCK)).enumerate() {
        ensure!(
            parse(blk) == Some((*b"BBBB", slot as u64)),
            "slot {slot} changed after the flip: {:?}",
            parse(blk)
        );
        ensure!(blk == rawblk, "slot {slot}: file and NBD view differ");
    }
    Ok(())
}

fn scenario(via_api: bool) -> Result<()> {
    let (_dir, s) = Storaged::start_with_volume("vol", "256M", &[])?;
    let rt = tokio::runtime::Runtime::new()?;
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
