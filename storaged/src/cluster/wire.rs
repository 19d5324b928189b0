//! The replication stream between a volume's master and one of its slaves.
//!
//! One TCP connection per (volume, slave), opened by the master:
//!
//! ```text
//! master                                   slave
//!   | -- Hello {version, term, volume, from} -->|  checks: version, volume placed here,
//!   |                                           |  term == the volume's elected term in
//!   |                                           |  etcd and >= every term seen before
//!   | <-------- HelloReply {status, term} ----- |
//!   | -- Op {seq, kind, flags, offset, len} --> |  WRITE carries `len` bytes of data
//!   | -- Op ... (pipelined)                 --> |  applied one after the other, in order
//!   | <------------------ Ack {seq, status} --- |  sent once the op is applied (durable
//!   |                                           |  when FUA or FLUSH)
//! ```
//!
//! When storaged has a TLS directory, the connection is TLS from its first byte, both sides
//! presenting their host certificates (the NBD port's); a node's id is its certificate's host
//! id, the master checks the slave's certificate against the slave's node id, and the slave
//! refuses ([`Status::Forbidden`]) a hello whose `from` is not the node the master's certificate
//! names or not the volume's elected master. Without TLS, `from` is only checked against the
//! election.
//!
//! All integers are big-endian. [`HELLO_MAGIC`] opens the stream and carries no version; the
//! version follows it, and a slave answers [`Status::BadVersion`] to any version other than
//! [`VERSION`] (a newer master can then fall back or report the mismatch). Strings are a `u16`
//! length and UTF-8 bytes, at most [`MAX_NAME`] bytes. A write's data is at most
//! [`MAX_DATA`] bytes. Every reply carries the highest term the slave has seen for the volume,
//! so a deposed master learns it was replaced.

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Opens every replication stream: "VMHREPL" and a zero byte.
pub const HELLO_MAGIC: u64 = 0x564D_4852_4550_4C00;
/// The version of this format.
pub const VERSION: u16 = 1;
/// Longest volume name or node id.
pub const MAX_NAME: usize = 255;
/// Largest write payload.
pub const MAX_DATA: u32 = 32 << 20;
/// Bytes of an op header.
pub const OP_LEN: usize = 1 + 1 + 8 + 8 + 4;
/// Bytes of an ack.
pub const ACK_LEN: usize = 8 + 4 + 8;
/// Bytes of a hello reply.
pub const HELLO_REPLY_LEN: usize = 4 + 8;

/// Op kind: write `len` bytes of data that follow the header.
pub const OP_WRITE: u8 = 1;
/// Op kind: zero a range.
pub const OP_WRITE_ZEROES: u8 = 2;
/// Op kind: deallocate a range.
pub const OP_TRIM: u8 = 3;
/// Op kind: make everything applied so far durable.
pub const OP_FLUSH: u8 = 4;

/// Op flag: durable before the ack (NBD's FUA).
pub const FLAG_FUA: u8 = 1;
/// Op flag: keep a zeroed range allocated (NBD's NO_HOLE).
pub const FLAG_NO_HOLE: u8 = 2;

/// A frame that could not be decoded.
#[derive(Debug, Error)]
pub enum WireError {
    /// Socket error.
    #[error("replication stream")]
    Io(#[from] std::io::Error),
    /// The stream does not start with [`HELLO_MAGIC`].
    #[error("not a replication stream (magic {0:#x})")]
    Magic(u64),
    /// A name longer than [`MAX_NAME`] or not UTF-8.
    #[error("bad name in hello")]
    Name,
    /// An op kind or flag this version does not know.
    #[error("unknown op kind {kind} or flags {flags:#x}")]
    Op {
        /// Kind byte.
        kind: u8,
        /// Flag byte.
        flags: u8,
    },
    /// A write larger than [`MAX_DATA`].
    #[error("write of {0} bytes exceeds the limit")]
    TooBig(u32),
    /// A status this version does not know.
    #[error("unknown status {0}")]
    Status(u32),
}

/// The slave's answer to a hello or an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    /// Accepted / applied.
    Ok = 0,
    /// The term is older than one the slave has seen, or not the elected one.
    StaleTerm = 1,
    /// The volume is not placed on this node.
    UnknownVolume = 2,
    /// Applying the op failed on the slave's disk.
    Io = 3,
    /// The hello's version is not [`VERSION`].
    BadVersion = 4,
    /// The slave could not check the term (etcd unreachable).
    Unavailable = 5,
    /// The sender is not the volume's elected master, or its TLS certificate names another
    /// node than the hello.
    Forbidden = 6,
}

impl Status {
    fn from_u32(v: u32) -> Result<Status, WireError> {
        Ok(match v {
            0 => Status::Ok,
            1 => Status::StaleTerm,
            2 => Status::UnknownVolume,
            3 => Status::Io,
            4 => Status::BadVersion,
            5 => Status::Unavailable,
            6 => Status::Forbidden,
            other => return Err(WireError::Status(other)),
        })
    }
}

/// Opens a stream: the master's term for the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Format version.
    pub version: u16,
    /// The master's term (fencing token).
    pub term: u64,
    /// Volume name.
    pub volume: String,
    /// The master's node id.
    pub from: String,
}

impl Hello {
    /// Encodes the hello.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut v = Vec::with_capacity(32 + self.volume.len() + self.from.len());
        v.extend_from_slice(&HELLO_MAGIC.to_be_bytes());
        v.extend_from_slice(&self.version.to_be_bytes());
        v.extend_from_slice(&self.term.to_be_bytes());
        for s in [&self.volume, &self.from] {
            if s.len() > MAX_NAME {
                return Err(WireError::Name);
            }
            v.extend_from_slice(&(s.len() as u16).to_be_bytes());
            v.extend_from_slice(s.as_bytes());
        }
        Ok(v)
    }

    /// Reads a hello. A version other than [`VERSION`] is returned as is for the caller to
    /// refuse; the rest of the hello has the same layout in every version.
    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Hello, WireError> {
        let magic = r.read_u64().await?;
        if magic != HELLO_MAGIC {
            return Err(WireError::Magic(magic));
        }
        let version = r.read_u16().await?;
        let term = r.read_u64().await?;
        let volume = read_name(r).await?;
        let from = read_name(r).await?;
        Ok(Hello {
            version,
            term,
            volume,
            from,
        })
    }
}

async fn read_name<R: AsyncRead + Unpin>(r: &mut R) -> Result<String, WireError> {
    let len = r.read_u16().await? as usize;
    if len > MAX_NAME {
        return Err(WireError::Name);
    }
    let mut b = vec![0u8; len];
    r.read_exact(&mut b).await?;
    String::from_utf8(b).map_err(|_| WireError::Name)
}

/// The slave's answer to a [`Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloReply {
    /// Accepted or why not.
    pub status: Status,
    /// The highest term the slave has seen for the volume.
    pub term: u64,
}

impl HelloReply {
    /// Encodes the reply.
    pub fn encode(&self) -> [u8; HELLO_REPLY_LEN] {
        let mut b = [0u8; HELLO_REPLY_LEN];
        b[..4].copy_from_slice(&(self.status as u32).to_be_bytes());
        b[4..].copy_from_slice(&self.term.to_be_bytes());
        b
    }

    /// Decodes the reply.
    pub fn decode(b: &[u8; HELLO_REPLY_LEN]) -> Result<HelloReply, WireError> {
        Ok(HelloReply {
            status: Status::from_u32(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))?,
            term: u64::from_be_bytes(b[4..].try_into().expect("8 bytes")),
        })
    }
}

/// One replicated command's header; a write's data follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpHeader {
    /// One of `OP_*`.
    pub kind: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Sequence number, echoed in the ack.
    pub seq: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Length of the range (and of the data, for a write).
    pub length: u32,
}

impl OpHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; OP_LEN] {
        let mut b = [0u8; OP_LEN];
        b[0] = self.kind;
        b[1] = self.flags;
        b[2..10].copy_from_slice(&self.seq.to_be_bytes());
        b[10..18].copy_from_slice(&self.offset.to_be_bytes());
        b[18..22].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decodes and checks a header.
    pub fn decode(b: &[u8; OP_LEN]) -> Result<OpHeader, WireError> {
        let h = OpHeader {
            kind: b[0],
            flags: b[1],
            seq: u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(b[10..18].try_into().expect("8 bytes")),
            length: u32::from_be_bytes(b[18..22].try_into().expect("4 bytes")),
        };
        let known = matches!(h.kind, OP_WRITE | OP_WRITE_ZEROES | OP_TRIM | OP_FLUSH);
        if !known || h.flags & !(FLAG_FUA | FLAG_NO_HOLE) != 0 {
            return Err(WireError::Op {
                kind: h.kind,
                flags: h.flags,
            });
        }
        if h.kind == OP_WRITE && h.length > MAX_DATA {
            return Err(WireError::TooBig(h.length));
        }
        Ok(h)
    }

    /// Bytes of data that follow the header.
    pub fn data_len(&self) -> usize {
        if self.kind == OP_WRITE {
            self.length as usize
        } else {
            0
        }
    }
}

/// The slave's answer to one op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The op's sequence number.
    pub seq: u64,
    /// Applied or why not.
    pub status: Status,
    /// The highest term the slave has seen for the volume.
    pub term: u64,
}

impl Ack {
    /// Encodes the ack.
    pub fn encode(&self) -> [u8; ACK_LEN] {
        let mut b = [0u8; ACK_LEN];
        b[..8].copy_from_slice(&self.seq.to_be_bytes());
        b[8..12].copy_from_slice(&(self.status as u32).to_be_bytes());
        b[12..].copy_from_slice(&self.term.to_be_bytes());
        b
    }

    /// Decodes the ack.
    pub fn decode(b: &[u8; ACK_LEN]) -> Result<Ack, WireError> {
        Ok(Ack {
            seq: u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
            status: Status::from_u32(u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")))?,
            term: u64::from_be_bytes(b[12..].try_into().expect("8 bytes")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hello_round_trip_and_checks() {
        let h = Hello {
            version: VERSION,
            term: 42,
            volume: "vol-1".into(),
            from: "node-a".into(),
        };
        let b = h.encode().unwrap();
        assert_eq!(&b[..8], b"VMHREPL\0");
        assert_eq!(Hello::read(&mut &b[..]).await.unwrap(), h);
        // A wrong magic, a truncated hello and an oversize name are refused.
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert!(matches!(
            Hello::read(&mut &bad[..]).await,
            Err(WireError::Magic(_))
        ));
        assert!(matches!(
            Hello::read(&mut &b[..b.len() - 1]).await,
            Err(WireError::Io(_))
        ));
        let long = Hello {
            volume: "v".repeat(MAX_NAME + 1),
            ..h.clone()
        };
        assert!(matches!(long.encode(), Err(WireError::Name)));
        // Another version decodes, so that the slave can answer BadVersion.
        let newer = Hello { version: 2, ..h };
        assert_eq!(
            Hello::read(&mut &newer.encode().unwrap()[..])
                .await
                .unwrap()
                .version,
            2
        );
    }

    #[test]
    fn op_and_ack_round_trip() {
        let op = OpHeader {
            kind: OP_WRITE,
            flags: FLAG_FUA,
            seq: 7,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(OpHeader::decode(&op.encode()).unwrap(), op);
        assert_eq!(op.data_len(), 4096);
        let trim = OpHeader {
            kind: OP_TRIM,
            ..op
        };
        assert_eq!(trim.data_len(), 0);
        let ack = Ack {
            seq: 7,
            status: Status::StaleTerm,
            term: 9,
        };
        assert_eq!(Ack::decode(&ack.encode()).unwrap(), ack);
        let r = HelloReply {
            status: Status::BadVersion,
            term: 3,
        };
        assert_eq!(HelloReply::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn unknown_ops_flags_statuses_and_oversize_writes_are_refused() {
        let op = OpHeader {
            kind: 9,
            flags: 0,
            seq: 1,
            offset: 0,
            length: 0,
        };
        assert!(matches!(
            OpHeader::decode(&op.encode()),
            Err(WireError::Op { kind: 9, .. })
        ));
        let flags = OpHeader {
            kind: OP_FLUSH,
            flags: 0x80,
            ..op
        };
        assert!(OpHeader::decode(&flags.encode()).is_err());
        let big = OpHeader {
            kind: OP_WRITE,
            length: MAX_DATA + 1,
            ..op
        };
        assert!(matches!(
            OpHeader::decode(&big.encode()),
            Err(WireError::TooBig(_))
        ));
        let mut ack = Ack {
            seq: 1,
            status: Status::Ok,
            term: 1,
        }
        .encode();
        ack[11] = 99;
        assert!(matches!(Ack::decode(&ack), Err(WireError::Status(99))));
    }
}
