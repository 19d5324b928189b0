//! The guest agent's line protocol and data formats, shared by the agent (the guest's init) and
//! the host-side tests that drive it.
//!
//! # Protocol
//! The agent speaks on the guest's first serial port (`/dev/ttyS0`), which is also the kernel
//! console, so every line the agent writes starts with [`LINE_PREFIX`] and hosts ignore the rest.
//! Commands are single lines; each gets exactly one reply line, in order:
//!
//! ```text
//! (boot)                 -> @agent ready version=1 boot_id=<uuid> uptime_ms=<n>
//! ping                   -> @agent ok pong
//! clock                  -> @agent ok clock boot_id=<uuid> uptime_ms=<n>
//! mem start <MiB> [<T>]  -> @agent ok mem started mib=<n> threads=<t> touch_ms=<n>
//! mem status             -> @agent ok mem seq=<min> seqs=<a,b..> cpus=<c,d..> errors=<n>
//!                                  checksum=<hex> maxgap_us=<n>
//! mem stop               -> @agent ok mem stopped seq=<n> errors=<n>
//! disk start [<dev>]     -> @agent ok disk started dev=<path> next=<n>
//! disk status            -> @agent ok disk state=<running|stopped|full|failed> acked=<n>
//! disk stop              -> @agent ok disk stopped acked=<n>
//! disk verify [<dev>]    -> @agent ok disk verified=<n> boot_ids=<n>
//! reboot | poweroff      -> @agent ok rebooting | @agent ok powering off (then resets or halts)
//! anything else          -> @agent err <message>
//! ```
//!
//! The memory workload writes a sequence-numbered pattern ([`pattern`]) over its buffer, one
//! pass per sequence number, checking before each write that the word still holds the previous
//! pass's value; a mismatch counts in `errors`. `checksum` is the wrapping sum of every word
//! read in each thread's last completed pass, which a host recomputes with
//! [`expected_checksum`]. `maxgap_us` is the largest time between two consecutive page steps of
//! the loop, measured with the TSC, since the previous `mem status` (the pause a migration
//! causes, as the guest sees it).
//!
//! The disk workload appends [`Record`]s of [`RECORD_SIZE`] bytes at offset `seq * RECORD_SIZE`
//! of a block device with O_DIRECT, in batches each followed by fsync; `acked` counts the
//! records that fsync has made durable. `disk verify` stops the writer and counts the valid,
//! consecutive records from the start of the device.
//!
//! Version policy: the `version` in the ready line changes whenever a reply changes meaning.
#![no_std]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(test)]
extern crate std;

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// Every agent line starts with this.
pub const LINE_PREFIX: &str = "@agent ";
/// Protocol version announced in the ready line.
pub const PROTOCOL_VERSION: u32 = 1;
/// Size of one disk record and the unit of its placement.
pub const RECORD_SIZE: usize = 4096;
/// First eight bytes of every disk record.
pub const RECORD_MAGIC: u64 = u64::from_le_bytes(*b"VMHOPREC");
/// 64-bit words in one MiB of the memory workload's buffer.
pub const WORDS_PER_MIB: usize = (1 << 20) / 8;

/// The value the memory workload writes to word `index` in pass `seq` (pass 0 is the zeroed
/// buffer).
pub fn pattern(seq: u64, index: u64) -> u64 {
    if seq == 0 {
        return 0;
    }
    let x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    (x ^ (x >> 29)) | 1
}

/// The word range of thread `thread` out of `threads` over a buffer of `words` words.
pub fn thread_range(words: usize, threads: usize, thread: usize) -> core::ops::Range<usize> {
    let per = words / threads;
    let start = per * thread;
    let end = if thread + 1 == threads {
        words
    } else {
        start + per
    };
    start..end
}

/// The checksum `mem status` must report for a buffer of `mib` MiB split over `seqs.len()`
/// threads whose last completed passes are `seqs`.
pub fn expected_checksum(mib: usize, seqs: &[u64]) -> u64 {
    let words = mib * WORDS_PER_MIB;
    let mut sum = 0u64;
    for (t, &seq) in seqs.iter().enumerate() {
        if seq == 0 {
            continue;
        }
        for i in thread_range(words, seqs.len(), t) {
            sum = sum.wrapping_add(pattern(seq - 1, i as u64));
        }
    }
    sum
}

/// FNV-1a, 64 bit: the disk record checksum.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// One disk record: `magic | seq | boot_id[16] | payload | checksum`, little endian, where the
/// payload bytes are derived from `seq` and the checksum is [`fnv1a`] of everything before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Position of the record on the device, in records.
    pub seq: u64,
    /// The boot id of the guest that wrote it (first 16 bytes of its text form, as bytes).
    pub boot_id: [u8; 16],
}

impl Record {
    /// Writes the record's bytes into `out`, which is [`RECORD_SIZE`] long.
    pub fn encode(&self, out: &mut [u8]) {
        assert_eq!(out.len(), RECORD_SIZE);
        out[0..8].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..32].copy_from_slice(&self.boot_id);
        let fill = (self.seq as u8).wrapping_mul(31).wrapping_add(7);
        for (i, b) in out[32..RECORD_SIZE - 8].iter_mut().enumerate() {
            *b = fill.wrapping_add(i as u8);
        }
        let sum = fnv1a(&out[..RECORD_SIZE - 8]);
        out[RECORD_SIZE - 8..].copy_from_slice(&sum.to_le_bytes());
    }

    /// Parses a record, or `None` if the bytes are not a valid record for position `seq`.
    pub fn decode(bytes: &[u8], seq: u64) -> Option<Record> {
        if bytes.len() != RECORD_SIZE {
            return None;
        }
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        if word(0) != RECORD_MAGIC || word(8) != seq {
            return None;
        }
        if word(RECORD_SIZE - 8) != fnv1a(&bytes[..RECORD_SIZE - 8]) {
            return None;
        }
        let mut boot_id = [0u8; 16];
        boot_id.copy_from_slice(&bytes[16..32]);
        Some(Record { seq, boot_id })
    }
}

/// A parsed agent reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `@agent ready ...`
    Ready(Fields),
    /// `@agent ok ...`
    Ok(Fields),
    /// `@agent err <message>`
    Err(String),
}

/// The words of a reply: bare words in order, and `key=value` pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    /// Words without `=`, in order.
    pub words: Vec<String>,
    /// `key=value` pairs.
    pub values: BTreeMap<String, String>,
}

impl Fields {
    fn parse(text: &str) -> Fields {
        let mut f = Fields::default();
        for w in text.split_whitespace() {
            match w.split_once('=') {
                Some((k, v)) => {
                    f.values.insert(k.to_string(), v.to_string());
                }
                None => f.words.push(w.to_string()),
            }
        }
        f
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// The value of `key` as an unsigned number, if present and numeric.
    pub fn num(&self, key: &str) -> Option<u64> {
        let v = self.get(key)?;
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        }
    }

    /// The value of `key` as a comma-separated list of numbers.
    pub fn nums(&self, key: &str) -> Option<Vec<u64>> {
        self.get(key)?.split(',').map(|s| s.parse().ok()).collect()
    }
}

impl Reply {
    /// Finds an agent reply in one line of serial output (kernel messages may precede it on the
    /// same line); `None` for lines that are not the agent's.
    pub fn parse_line(line: &str) -> Option<Reply> {
        let at = line.find(LINE_PREFIX)?;
        let rest = line[at + LINE_PREFIX.len()..].trim_end();
        let (kind, body) = rest.split_once(' ').unwrap_or((rest, ""));
        match kind {
            "ready" => Some(Reply::Ready(Fields::parse(body))),
            "ok" => Some(Reply::Ok(Fields::parse(body))),
            "err" => Some(Reply::Err(body.to_string())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn record_round_trip_and_corruption() {
        let rec = Record {
            seq: 42,
            boot_id: *b"0123456789abcdef",
        };
        let mut buf = vec![0u8; RECORD_SIZE];
        rec.encode(&mut buf);
        assert_eq!(Record::decode(&buf, 42), Some(rec));
        assert_eq!(Record::decode(&buf, 43), None, "wrong position");
        buf[100] ^= 1;
        assert_eq!(Record::decode(&buf, 42), None, "flipped bit");
        assert_eq!(Record::decode(&[0u8; RECORD_SIZE], 0), None, "zeroed block");
    }

    #[test]
    fn pattern_never_looks_like_a_fresh_page() {
        for seq in 1..50 {
            for i in 0..1000 {
                assert_ne!(pattern(seq, i), 0);
                assert_ne!(pattern(seq, i), pattern(seq + 1, i));
            }
        }
    }

    #[test]
    fn thread_ranges_cover_the_buffer() {
        let words = 3 * WORDS_PER_MIB + 5;
        let mut next = 0;
        for t in 0..3 {
            let r = thread_range(words, 3, t);
            assert_eq!(r.start, next);
            next = r.end;
        }
        assert_eq!(next, words);
    }

    #[test]
    fn checksum_of_first_pass_is_zero() {
        assert_eq!(expected_checksum(1, &[1, 1]), 0);
        assert_ne!(expected_checksum(1, &[2, 1]), 0);
    }

    #[test]
    fn parses_replies_amid_console_noise() {
        let r =
            Reply::parse_line("[   3.1] foo@agent ok mem seq=5 seqs=5,6 checksum=0x1f\r").unwrap();
        let Reply::Ok(f) = r else { panic!("{r:?}") };
        assert_eq!(f.words, vec!["mem"]);
        assert_eq!(f.num("seq"), Some(5));
        assert_eq!(f.nums("seqs"), Some(vec![5, 6]));
        assert_eq!(f.num("checksum"), Some(0x1f));
        assert_eq!(
            Reply::parse_line("@agent err no such command"),
            Some(Reply::Err("no such command".into()))
        );
        assert_eq!(Reply::parse_line("[    0.0] Linux version"), None);
    }
}
