//! The fencing checker: proof that a fenced host's writes never land.
//!
//! [`Writers::start`] makes a host write its own region of a volume through several
//! connections, each connection with several tasks, each task owning a contiguous run of
//! blocks and cycling through the commands a disk sees: plain and FUA writes, WRITE_ZEROES,
//! TRIM, and large writes (beyond storaged's inline-write limit, so they take the blocking
//! path). Every block written carries a record: the host's tag and the sequence number of the
//! command, with a checksum-like fill, so that a block read back names the one command that
//! wrote it. Every command's issue time and acknowledgement are logged.
//!
//! After the fence (a flip acknowledged by storaged, whoever triggered it), [`Writers::verify`]
//! reads the region through the new primary and judges:
//! - no byte of the fenced host lands after its deactivation was acknowledged: the region read
//!   right after the acknowledgement is polled again and again while nobody else writes it, and
//!   must not change; no block holds a record of a command issued after the acknowledgement;
//! - every acknowledged command is readable: each block holds what its last acknowledged
//!   command left (a record, or zeroes after WRITE_ZEROES and TRIM: storaged punches holes),
//!   or, if a command on it was in flight when the host was fenced, what that command would
//!   have left;
//! - the fenced host's writers all stopped with an error.
//!
//! The [`Verdict`] counts what was checked, so a test can report the checker's figures.

use anyhow::{ensure, Context, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use storaged_client::nbd::Client;

/// Size of a block, the unit of every record.
pub const BLOCK: usize = 4096;
/// Blocks of a large write: 256 KiB, beyond storaged's inline write limit (64 KiB).
const LARGE_BLOCKS: u64 = 64;
/// Blocks each task owns (room for one large write).
const TASK_BLOCKS: u64 = 2 * LARGE_BLOCKS;

/// The command a writer issues next, by its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Write,
    WriteFua,
    Zeroes,
    Trim,
    Large,
}

impl Op {
    fn of(seq: u64) -> Op {
        match seq % 8 {
            0 | 3 | 6 => Op::Write,
            1 | 5 => Op::WriteFua,
            2 => Op::Zeroes,
            4 => Op::Large,
            _ => Op::Trim,
        }
    }
}

/// What a block holds after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    /// The record of command `seq` (for block `block` of it).
    Record(u64),
    /// Zeroes.
    Zero,
}

/// A record: the host's tag, "REC2", the command's sequence number and the block's address,
/// then a fill derived from both.
pub fn record(tag: &[u8; 4], seq: u64, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[..4].copy_from_slice(tag);
    b[4..8].copy_from_slice(b"REC2");
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..24].copy_from_slice(&block.to_le_bytes());
    for (i, x) in b[24..].iter_mut().enumerate() {
        *x = (seq.wrapping_mul(31) ^ block.wrapping_mul(7)).wrapping_add(i as u64) as u8;
    }
    b
}

/// What a block read back holds: a whole record of `tag` (its command's sequence number),
/// zeroes, or anything else (`None`: torn, foreign or misplaced).
fn content_of(tag: &[u8; 4], block: u64, data: &[u8]) -> Option<Content> {
    if data.iter().all(|&x| x == 0) {
        return Some(Content::Zero);
    }
    if &data[..4] != tag || &data[4..8] != b"REC2" {
        return None;
    }
    let seq = u64::from_le_bytes(data[8..16].try_into().ok()?);
    (record(tag, seq, block) == data).then_some(Content::Record(seq))
}

/// Everything the writers logged.
#[derive(Default)]
struct Log {
    /// Issue time of every command, by sequence number.
    issued: HashMap<u64, Instant>,
    /// Per block: what its last acknowledged command left.
    acked: HashMap<u64, Content>,
    /// Per block: what a command still in flight would leave.
    in_flight: HashMap<u64, Content>,
    /// Commands acknowledged.
    acks: u64,
    /// How each writer task ended.
    ended: Vec<String>,
}

/// A host's writers on its region of a volume.
pub struct Writers {
    tag: [u8; 4],
    first_block: u64,
    blocks: u64,
    log: Arc<Mutex<Log>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What the checker found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Commands the fenced host had acknowledged, each checked.
    pub acknowledged: u64,
    /// Blocks checked.
    pub blocks: u64,
    /// Blocks whose command was in flight when the host was fenced (either outcome is right).
    pub in_flight: u64,
    /// Reads of the whole region while polling for late writes.
    pub polls: u64,
    /// Writes of the fenced host that landed after the fence's acknowledgement.
    pub stale_writes: u64,
}

impl Writers {
    /// Starts `tasks` writer tasks on each of `conns` (connections of one host), writing with
    /// `tag` from `first_block` on; the region is `conns.len() * tasks * 128` blocks.
    pub fn start(conns: &[Client], tasks: usize, tag: [u8; 4], first_block: u64) -> Writers {
        let log = Arc::new(Mutex::new(Log::default()));
        let next_seq = Arc::new(AtomicU64::new(1));
        let mut handles = Vec::new();
        for (c, conn) in conns.iter().enumerate() {
            for t in 0..tasks {
                let start = first_block + (c * tasks + t) as u64 * TASK_BLOCKS;
                let (conn, log, next_seq) = (conn.clone(), log.clone(), next_seq.clone());
                handles.push(tokio::spawn(async move {
                    let why = write_loop(&conn, tag, start, &log, &next_seq).await;
                    log.lock().unwrap().ended.push(why);
                }));
            }
        }
        Writers {
            tag,
            first_block,
            blocks: (conns.len() * tasks) as u64 * TASK_BLOCKS,
            log,
            tasks: handles,
        }
    }

    /// Commands acknowledged so far.
    pub fn acknowledged(&self) -> u64 {
        self.log.lock().unwrap().acks
    }

    /// Waits until `n` commands were acknowledged.
    pub async fn wait_acknowledged(&self, n: u64, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while self.acknowledged() < n {
            ensure!(
                Instant::now() < deadline,
                "only {} of {n} commands acknowledged within {limit:?}; writers ended: {:?}",
                self.acknowledged(),
                self.log.lock().unwrap().ended
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Judges the region after the host was fenced at `fenced_at` (when the flip, or whatever
    /// fenced it, was acknowledged), reading through `reader` (the new primary), which must
    /// not write the region. Polls for late writes during `settle`.
    pub async fn verify(
        self,
        reader: &Client,
        fenced_at: Instant,
        settle: Duration,
    ) -> Result<Verdict> {
        let first = self.read_region(reader).await?;
        let mut verdict = Verdict {
            blocks: self.blocks,
            ..Verdict::default()
        };
        let mut stale = Vec::new();
        // Late writes: nothing of the fenced host may change the region from now on.
        let until = Instant::now() + settle;
        while Instant::now() < until {
            let again = self.read_region(reader).await?;
            verdict.polls += 1;
            for (i, (a, b)) in first.chunks(BLOCK).zip(again.chunks(BLOCK)).enumerate() {
                if a != b {
                    let block = self.first_block + i as u64;
                    verdict.stale_writes += 1;
                    stale.push(format!(
                        "block {block} changed after the fence: {:?} then {:?}",
                        content_of(&self.tag, block, a),
                        content_of(&self.tag, block, b)
                    ));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ensure!(
            stale.is_empty(),
            "{} writes landed after the fence, e.g. {:?}",
            stale.len(),
            &stale[..stale.len().min(5)]
        );
        // The writers must all have stopped with an error by now.
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .context("a writer of the fenced host still runs")??;
        }
        let log = self.log.lock().unwrap();
        ensure!(
            log.ended.iter().all(|e| !e.is_empty()),
            "writers ended without an error: {:?}",
            log.ended
        );
        verdict.acknowledged = log.acks;
        for (i, data) in first.chunks(BLOCK).enumerate() {
            let block = self.first_block + i as u64;
            let found = content_of(&self.tag, block, data)
                .with_context(|| format!("block {block} holds a torn or foreign block"))?;
            if let Content::Record(seq) = found {
                let issued = log.issued.get(&seq).copied();
                if issued.is_none_or(|t| t > fenced_at) {
                    verdict.stale_writes += 1;
                    stale.push(format!(
                        "block {block} holds command {seq}, issued after the fence"
                    ));
                    continue;
                }
            }
            let expected = log.acked.get(&block).copied().unwrap_or(Content::Zero);
            let pending = log.in_flight.get(&block).copied();
            if pending.is_some() {
                verdict.in_flight += 1;
            }
            ensure!(
                found == expected || Some(found) == pending,
                "block {block} holds {found:?}; acknowledged {expected:?}, in flight {pending:?}"
            );
        }
        ensure!(
            stale.is_empty(),
            "{} writes of the fenced host landed after the fence, e.g. {:?}",
            stale.len(),
            &stale[..stale.len().min(5)]
        );
        Ok(verdict)
    }

    async fn read_region(&self, reader: &Client) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.blocks as usize * BLOCK);
        let chunk = 256;
        let mut b = 0;
        while b < self.blocks {
            let n = chunk.min(self.blocks - b);
            let off = (self.first_block + b) * BLOCK as u64;
            out.extend(reader.read(off, n as usize * BLOCK).await?);
            b += n;
        }
        Ok(out)
    }
}

/// One writer task: commands on its blocks until one fails; returns why it stopped.
async fn write_loop(
    conn: &Client,
    tag: [u8; 4],
    start: u64,
    log: &Mutex<Log>,
    next_seq: &AtomicU64,
) -> String {
    let mut i = 0u64;
    loop {
        let seq = next_seq.fetch_add(1, Ordering::SeqCst);
        let op = Op::of(seq);
        let (first, count) = match op {
            Op::Large => (start, LARGE_BLOCKS),
            _ => (start + LARGE_BLOCKS + i % LARGE_BLOCKS, 1),
        };
        i += 1;
        let content = match op {
            Op::Zeroes | Op::Trim => Content::Zero,
            _ => Content::Record(seq),
        };
        {
            let mut l = log.lock().unwrap();
            l.issued.insert(seq, Instant::now());
            for b in first..first + count {
                l.in_flight.insert(b, content);
            }
        }
        let offset = first * BLOCK as u64;
        let len = count as usize * BLOCK;
        let data = || {
            (first..first + count)
                .flat_map(|b| record(&tag, seq, b))
                .collect::<Vec<u8>>()
        };
        let r = match op {
            Op::Write | Op::Large => conn.write(offset, data(), false).await,
            Op::WriteFua => conn.write(offset, data(), true).await,
            Op::Zeroes => conn.write_zeroes(offset, len as u32, false, false).await,
            Op::Trim => conn.trim(offset, len as u32).await,
        };
        let mut l = log.lock().unwrap();
        match r {
            Ok(()) => {
                l.acks += 1;
                for b in first..first + count {
                    l.in_flight.remove(&b);
                    l.acked.insert(b, content);
                }
            }
            Err(e) => return format!("command {seq} ({op:?}): {e}"),
        }
    }
}
