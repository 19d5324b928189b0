//! Resync: bringing a copy that left the in-sync set (its node died, restarted, fell behind,
//! or was not the one elected after a failover) back into it, while clients keep writing.
//!
//! # Full copy, not a dirty-region map
//! A copy outside the in-sync set is brought back by copying the whole volume from the
//! master: every allocated range as data, every hole as a hole (`SEEK_DATA`/`SEEK_HOLE`, so a
//! sparse volume costs what it holds). A dirty-region map (the ranges written since the copy
//! left) would copy less, but it can only be trusted when it is complete, and it is not in
//! the cases that matter:
//! - a slave acknowledges a plain write once it is in its page cache (NBD promises durability
//!   only at FLUSH/FUA); if its *machine* went down, it lost writes it had acknowledged before
//!   it left the set, which no map of "writes since it left" names;
//! - the map lives in the master's memory: a failover loses it, and the new master has
//!   none for the copies it did not keep in its set (including the ones that may or may not
//!   have received the write that was in flight when the old master died);
//! - persisting it (in etcd or next to the volume) would put a durable write on the path of
//!   every client write.
//!
//! A full copy is correct from any state of the stale copy. Its cost is reading the volume
//! once on the master and sending its allocated bytes; while it runs, the slave is out of the
//! in-sync set, so the volume has one copy fewer than asked for until it is done.
//!
//! # How it stays consistent under writes
//! The master keeps trying every placed node that has no stream (every [`RETRY`]); once one
//! accepts a stream for this term, that stream is added to the links as *not counted*: client
//! writes are sent on it in their order, and nobody waits for its acks. The volume is then
//! read in chunks of [`CHUNK`] bytes, each chunk read and queued under the same order lock as
//! the client writes, so on the stream every chunk comes after the writes it reflects and
//! before those it does not: applied in stream order, the slave ends up with the master's
//! bytes. After the last chunk, under the order lock, the stream becomes *counted* (every later
//! client write waits for the slave) and a FLUSH is queued; once the slave acknowledged every
//! chunk, every write and the FLUSH (so all of it is durable), it joins the in-sync set in etcd
//! with a transaction guarded by the master's term. Any failure on the way (an ack other than
//! `Ok`, a timeout, the stream ending) drops the stream and the resync starts over later.

use super::placement_key;
use super::replica::{Link, LinkError, Op, Replicas};
use super::wire::{Ack, Status};
use super::{parse, Placement};
use crate::volume::{Volume, VolumeFile};
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use vmhop_common::error::chain as error_chain;

/// Bytes read and sent per step.
pub const CHUNK: u32 = 1 << 20;
/// Chunks sent and not yet acknowledged, at most.
const WINDOW: usize = 16;
/// How often the master tries the placed nodes that have no stream.
pub const RETRY: Duration = Duration::from_millis(500);

/// Runs for as long as `rep`'s term: resyncs every placed node that has no stream.
pub async fn run(rep: Arc<Replicas>, vol: Arc<Volume>) {
    let cluster = rep.cluster().clone();
    let me = cluster.node().to_string();
    let mut placed: Option<Vec<String>> = None;
    // A node that keeps refusing is retried quietly after its first failure is logged.
    let mut logged: std::collections::HashSet<String> = Default::default();
    loop {
        tokio::select! {
            _ = rep.fenced() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
        if placed.is_none() {
            let key = placement_key(rep.volume());
            if let Ok(resp) = super::get(&cluster.etcd(), key.clone(), None).await {
                if let Some(kv) = resp.kvs().first() {
                    placed = parse::<Placement>(&key, kv.value())
                        .ok()
                        .map(|p| p.replicas);
                }
            }
        }
        let Some(nodes) = &placed else { continue };
        for node in nodes.iter().filter(|n| **n != me) {
            if rep.is_fenced() {
                return;
            }
            if rep.slaves().contains(node) {
                continue;
            }
            let link = match Link::open(&cluster, node, rep.volume(), rep.term).await {
                Ok(l) => Arc::new(l),
                Err(e) => {
                    if logged.insert(node.clone()) {
                        tracing::info!(target: "storaged::cluster", volume = %rep.volume(),
                            slave = %node, error = %error_chain(&e),
                            "out-of-sync copy not reachable yet");
                    }
                    continue;
                }
            };
            logged.remove(node);
            let started = Instant::now();
            tracing::info!(target: "storaged::cluster", event = "resync-start",
                volume = %rep.volume(), slave = %node, term = rep.term,
                "resync started (full copy)");
            match resync(&rep, &vol, node, &link).await {
                Ok(bytes) => {
                    tracing::info!(target: "storaged::cluster", event = "resync-done",
                        volume = %rep.volume(), slave = %node, bytes,
                        ms = started.elapsed().as_millis() as u64,
                        "resync done: the copy is in sync again")
                }
                Err(e) => {
                    tracing::warn!(target: "storaged::cluster", event = "resync-failed",
                        volume = %rep.volume(), slave = %node, error = %error_chain(&e),
                        "resync failed; it starts over later");
                    if rep.drop_member(node).await.is_err() {
                        rep.fence();
                    }
                }
            }
        }
    }
}

/// The ops that make a copy of `offset..offset + len` what it is here: data as writes, holes
/// as trims.
fn read_chunk(file: &VolumeFile, offset: u64, len: u32) -> std::io::Result<Vec<Op>> {
    let end = offset + u64::from(len);
    let mut ops = Vec::new();
    let mut at = offset;
    while at < end {
        let spans = file.spans(at, (end - at) as u32, 64)?;
        if spans.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        for s in spans {
            if s.allocated {
                let mut buf = vec![0u8; s.length as usize];
                file.read_at(&mut buf, at)?;
                ops.push(Op::Write {
                    offset: at,
                    data: Bytes::from(buf),
                    fua: false,
                });
            } else {
                ops.push(Op::Trim {
                    offset: at,
                    len: s.length,
                    fua: false,
                });
            }
            at += u64::from(s.length);
        }
    }
    Ok(ops)
}

/// Waits for one ack; anything but `Ok` in time is a failure.
async fn acked(rep: &Replicas, rx: oneshot::Receiver<Ack>) -> Result<(), LinkError> {
    match tokio::time::timeout(rep.cluster().config.replication_timeout, rx).await {
        Ok(Ok(a)) if a.status == Status::Ok => Ok(()),
        Ok(Ok(a)) => Err(LinkError::Answered(a.status)),
        Ok(Err(_)) => Err(LinkError::Ended),
        Err(_) => Err(LinkError::Timeout),
    }
}

/// Copies the volume to `node` over `link` and adds it to the in-sync set; returns the bytes
/// of data sent.
async fn resync(
    rep: &Replicas,
    vol: &Volume,
    node: &str,
    link: &Arc<Link>,
) -> Result<u64, LinkError> {
    link.counted.store(false, Ordering::SeqCst);
    {
        let _order = rep.order.lock().await;
        rep.links.lock().expect("links lock").push(link.clone());
    }
    let size = vol.config.size;
    let mut window: VecDeque<oneshot::Receiver<Ack>> = VecDeque::new();
    let mut sent = 0u64;
    let mut offset = 0u64;
    while offset < size {
        let len = (size - offset).min(u64::from(CHUNK)) as u32;
        {
            let _order = rep.order.lock().await;
            if !rep.usable() {
                return Err(LinkError::MastershipEnded);
            }
            let file = vol.file.clone();
            let ops = tokio::task::spawn_blocking(move || read_chunk(&file, offset, len))
                .await
                .map_err(|e| LinkError::Read(std::io::Error::other(e)))?
                .map_err(LinkError::Read)?;
            for op in &ops {
                if let Op::Write { data, .. } = op {
                    sent += data.len() as u64;
                }
                window.push_back(link.send(op).await.ok_or(LinkError::Ended)?);
            }
        }
        while window.len() > WINDOW {
            acked(rep, window.pop_front().expect("not empty")).await?;
        }
        offset += u64::from(len);
    }
    // From here on client writes wait for this slave too; the FLUSH makes all it has durable.
    {
        let _order = rep.order.lock().await;
        link.counted.store(true, Ordering::SeqCst);
        window.push_back(link.send(&Op::Flush).await.ok_or(LinkError::Ended)?);
    }
    while let Some(rx) = window.pop_front() {
        acked(rep, rx).await?;
    }
    rep.add_member(node, link).await?;
    Ok(sent)
}
