//! The NBD wire format as storaged speaks it, plus the project's lease extension.
//!
//! All integers are big-endian. Only the fixed newstyle handshake is supported.
//!
//! # Handshake
//! ```text
//! S: NBDMAGIC (u64) IHAVEOPT (u64) handshake flags (u16: FIXED_NEWSTYLE | NO_ZEROES)
//! C: client flags (u32: C_FIXED_NEWSTYLE [| C_NO_ZEROES])
//! repeat:
//!   C: IHAVEOPT (u64) option (u32) length (u32) data
//!   S: REP_MAGIC (u64) option (u32) reply type (u32) length (u32) data   (one or more)
//! until OPT_GO / OPT_EXPORT_NAME succeeds (transmission) or OPT_ABORT (soft disconnect).
//! ```
//! Options understood: `EXPORT_NAME`, `ABORT`, `LIST`, `STARTTLS`, `INFO`, `GO`,
//! `STRUCTURED_REPLY`, the meta context options of [`crate::meta`] and the project option
//! [`NBD_OPT_LEASE`]; any other (extended headers among them) gets `NBD_REP_ERR_UNSUP`. The empty
//! export name is the server's default export. `INFO` and `GO` answer `NBD_INFO_EXPORT`, and the
//! `NAME`, `DESCRIPTION` and `BLOCK_SIZE` items when asked for.
//!
//! # TLS
//! [`NBD_OPT_STARTTLS`] (no data) is answered `NBD_REP_ACK`, then both sides run a TLS handshake
//! on the same socket and the option haggling starts afresh inside TLS (what was negotiated
//! before, such as structured replies or a lease, is forgotten). The server asks for a client
//! certificate of the cluster's CA; its host id (the certificate's DNS name) is the connection's
//! identity, and a lease option naming another host is refused with `NBD_REP_ERR_POLICY`. A
//! server that requires TLS answers every option but `STARTTLS` and `ABORT` sent in plaintext
//! with [`NBD_REP_ERR_TLS_REQD`] (and closes the connection on `EXPORT_NAME`, which has no error
//! reply); one without TLS answers `STARTTLS` with `NBD_REP_ERR_POLICY`.
//!
//! # Lease option
//! A lease-aware client sends [`NBD_OPT_LEASE`] (0x4C45_4153, ASCII "LEAS", far above every
//! registered option number, which are small integers) before `NBD_OPT_GO`. Layout of its data:
//! ```text
//! u16 version (LEASE_VERSION = 1)
//! u8  requested state (LEASE_STATE_PRIMARY = 1, LEASE_STATE_STANDBY = 2)
//! u8  reserved, zero
//! u64 expected epoch (0 = any)
//! u16 host id length, host id (UTF-8, 1..=255 bytes)
//! u16 instance id length, instance id (UTF-8, 1..=255 bytes)
//! ```
//! The server answers `NBD_REP_ACK` when the option is well-formed (the lease itself is decided
//! at `NBD_OPT_GO`, which names the volume), `NBD_REP_ERR_INVALID` otherwise. A refused lease
//! makes `NBD_OPT_GO` fail with one of the `NBD_REP_ERR_LEASE_*` codes and a text message. A
//! granted lease adds one `NBD_REP_INFO` of type [`NBD_INFO_LEASE`] before the final ACK:
//! `u16 NBD_INFO_LEASE, u8 granted state, u64 epoch`.
//! In cluster mode a node that is not the volume's master fails `NBD_OPT_GO` (and `INFO`)
//! with [`NBD_REP_ERR_NOT_MASTER`], naming the master's address when it knows it; the client
//! then tries the master, then the volume's next address.
//!
//! # Transmission
//! ```text
//! C: REQUEST_MAGIC (u32) flags (u16) type (u16) handle (u64) offset (u64) length (u32) [data]
//! S: SIMPLE_REPLY_MAGIC (u32) error (u32) handle (u64) [data]
//!  | STRUCTURED_REPLY_MAGIC (u32) flags (u16) type (u16) handle (u64) length (u32) payload
//! ```
//! Commands: `READ`, `WRITE`, `DISC`, `FLUSH`, `TRIM`, `CACHE`, `WRITE_ZEROES` (`NO_HOLE`;
//! `FAST_ZERO`: `ENOTSUP` rather than writing zeroes), `BLOCK_STATUS` ([`crate::meta`]).
//! Replies may come in any order. [`NBD_CMD_LEASE_FLIP`] (0x4C46) asks the server to promote the
//! connection's standby lease to primary; offset and length must be zero on the wire except
//! that length carries [`FLIP_REPORT_LEN`], the size of the reply payload, which is a
//! [`FlipReport`] (sent as data after a simple reply, or as one `OFFSET_DATA` chunk at offset 0
//! when structured replies are on). Where each of these messages ends on the stream, and the
//! limits on their lengths, is the framing in [`crate::codec`].
//!
//! # Version policy
//! The NBD parts follow the upstream specification; unknown flags in a request are rejected with
//! `EINVAL`. The lease option carries its own version: the server accepts exactly
//! [`LEASE_VERSION`] and answers `NBD_REP_ERR_INVALID` to any other, so a newer client can fall
//! back. The flip report layout is tied to the same version.

pub use crate::lease::{encode_info_lease, FlipReport, LeaseOption, RequestedState};
use bytes::{Buf, BufMut};
use thiserror::Error;

/// "NBDMAGIC": first bytes of the handshake.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle marker, also the prefix of each option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of each option reply.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of each request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle negotiation.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option: choose an export and enter transmission (no error reply possible).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Option: soft disconnect.
pub const NBD_OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Option: upgrade the connection to TLS (see the module docs).
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const NBD_OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Option: enable structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// Project option: declare host, instance and requested lease state (see module docs).
pub const NBD_OPT_LEASE: u32 = 0x4C45_4153;

/// Option reply: success, final.
pub const NBD_REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const NBD_REP_SERVER: u32 = 2;
/// Option reply: an information item.
pub const NBD_REP_INFO: u32 = 3;
/// Base of error reply types.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// Error: option not supported.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
/// Error: forbidden by policy.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
/// Error: malformed option.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
/// Error: the server requires TLS before this option.
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
/// Error: no such export.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
/// Error: the server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
/// Error: option data too big.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;
/// Project error: the host was deactivated on this volume and may not connect again.
pub const NBD_REP_ERR_LEASE_DEACTIVATED: u32 = NBD_REP_FLAG_ERROR | 0x4C01;
/// Project error: standby requested, but this host already holds the primary lease.
pub const NBD_REP_ERR_LEASE_ALREADY_PRIMARY: u32 = NBD_REP_FLAG_ERROR | 0x4C02;
/// Project error: primary requested while another holder is primary.
pub const NBD_REP_ERR_LEASE_CONFLICT: u32 = NBD_REP_FLAG_ERROR | 0x4C03;
/// Project error: the expected epoch does not match the volume's epoch.
pub const NBD_REP_ERR_LEASE_EPOCH: u32 = NBD_REP_FLAG_ERROR | 0x4C04;
/// Project error (cluster mode): this node is not the volume's master; the message names the
/// volume and, when the node knows it, the master's NBD address tagged
/// `[master-nbd=HOST:PORT]` ([`master_hint`]). A client tries that address next, then the
/// volume's next address, as for no answer.
pub const NBD_REP_ERR_NOT_MASTER: u32 = NBD_REP_FLAG_ERROR | 0x4C05;

/// Tags the master's NBD address in the message of [`NBD_REP_ERR_NOT_MASTER`].
pub const MASTER_NBD_TAG: &str = "master-nbd=";

/// The master's NBD address named in the message of a [`NBD_REP_ERR_NOT_MASTER`] refusal.
pub fn master_hint(message: &str) -> Option<&str> {
    let at = message.find(MASTER_NBD_TAG)? + MASTER_NBD_TAG.len();
    let rest = &message[at..];
    let addr = &rest[..rest.find(']')?];
    (!addr.is_empty() && addr.len() <= 256).then_some(addr)
}

/// Info item: size and transmission flags.
pub const NBD_INFO_EXPORT: u16 = 0;
/// Info item: the export's canonical name (what an empty name stands for).
pub const NBD_INFO_NAME: u16 = 1;
/// Info item: a human-readable description of the export.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Info item: block size constraints.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;
/// Project info item: the granted lease (`u8 state, u64 epoch`).
pub const NBD_INFO_LEASE: u16 = 0x4C45;

/// Transmission flag: the flags field is valid.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: read-only export.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: FLUSH supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: FUA supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: TRIM supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: WRITE_ZEROES supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: the DF command flag is understood (reads are never fragmented).
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: a FLUSH on one connection covers writes completed on all of them.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: CACHE supported.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: the FAST_ZERO command flag is understood.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command flag: force unit access.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: WRITE_ZEROES must not punch holes.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: a structured read must come in one chunk ("don't fragment").
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: WRITE_ZEROES must fail with `ENOTSUP` unless it is fast (no data written).
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Command: read.
pub const NBD_CMD_READ: u16 = 0;
/// Command: write.
pub const NBD_CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const NBD_CMD_DISC: u16 = 2;
/// Command: flush.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const NBD_CMD_TRIM: u16 = 4;
/// Command: prefetch a range into the server's cache.
pub const NBD_CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Project command: promote this standby connection's lease to primary.
pub const NBD_CMD_LEASE_FLIP: u16 = 0x4C46;

/// Structured reply flag: last chunk of the reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured chunk: no payload.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Structured chunk: `u64 offset` then data.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured chunk: `u32 error, u16 message length, message`.
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// Error value: operation not permitted (lease does not allow it).
pub const NBD_EPERM: u32 = 1;
/// Error value: I/O error.
pub const NBD_EIO: u32 = 5;
/// Error value: out of memory.
pub const NBD_ENOMEM: u32 = 12;
/// Error value: invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// Error value: no space left.
pub const NBD_ENOSPC: u32 = 28;
/// Error value: request beyond the end of the export or above the maximum size.
pub const NBD_EOVERFLOW: u32 = 75;
/// Error value: command not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// Error value: the server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

/// Version of the lease option layout.
pub const LEASE_VERSION: u16 = 1;
/// Requested / granted state: primary.
pub const LEASE_STATE_PRIMARY: u8 = 1;
/// Requested / granted state: standby.
pub const LEASE_STATE_STANDBY: u8 = 2;
/// Longest host or instance id.
pub const MAX_ID_LEN: usize = 255;
/// Longest option data the server reads; longer options are refused with TOO_BIG.
pub const MAX_OPTION_LEN: u32 = 4096;
/// Longest string in an option or info item (export name, description, context name).
pub const MAX_STRING_LEN: usize = 4096;
/// Largest request payload the server accepts and advertises (NBD_INFO_BLOCK_SIZE maximum).
pub const MAX_REQUEST_LEN: u32 = 32 << 20;
/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Size of an option reply header.
pub const OPTION_REPLY_LEN: usize = 20;
/// Size of the flip report payload.
pub const FLIP_REPORT_LEN: u32 = 64;

/// Malformed wire data.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// A magic number did not match.
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic {
        /// What arrived.
        found: u64,
        /// What the protocol requires.
        expected: u64,
    },
    /// A message was shorter than its layout.
    #[error("truncated message: {0}")]
    Truncated(&'static str),
    /// A field held a value the layout does not allow.
    #[error("invalid field: {0}")]
    Invalid(&'static str),
    /// The lease option has a version this code does not speak.
    #[error("unsupported lease option version {0}")]
    Version(u16),
}

/// Cursor over a byte slice that reports truncation instead of panicking.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::Truncated(self.what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }
    pub(crate) fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, ProtocolError> {
        self.array().map(u16::from_be_bytes)
    }
    pub(crate) fn u32(&mut self) -> Result<u32, ProtocolError> {
        self.array().map(u32::from_be_bytes)
    }
    pub(crate) fn u64(&mut self) -> Result<u64, ProtocolError> {
        self.array().map(u64::from_be_bytes)
    }
    pub(crate) fn string(&mut self, len: usize) -> Result<String, ProtocolError> {
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| ProtocolError::Invalid("string is not UTF-8"))
    }
    pub(crate) fn finish(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Invalid("trailing bytes"))
        }
    }
}

pub(crate) fn reader<'a>(buf: &'a [u8], what: &'static str) -> Reader<'a> {
    Reader { buf, what }
}

/// A fixed-size header: `put` writes its big-endian fields in order.
pub(crate) fn header<const N: usize>(put: impl FnOnce(&mut &mut [u8])) -> [u8; N] {
    let mut b = [0u8; N];
    put(&mut &mut b[..]);
    b
}

/// Requests and structured reply chunks start alike: magic, flags, type, handle.
fn put_command(w: &mut &mut [u8], magic: u32, flags: u16, kind: u16, handle: u64) {
    w.put_u32(magic);
    w.put_u16(flags);
    w.put_u16(kind);
    w.put_u64(handle);
}

/// Reads what [`put_command`] writes, checking the magic: (flags, type, handle).
fn get_command(r: &mut &[u8], magic: u32) -> Result<(u16, u16, u64), ProtocolError> {
    check_magic(r.get_u32(), magic)?;
    Ok((r.get_u16(), r.get_u16(), r.get_u64()))
}

/// Checks the magic number at the start of a header.
fn check_magic(found: impl Into<u64>, expected: impl Into<u64>) -> Result<(), ProtocolError> {
    let (found, expected) = (found.into(), expected.into());
    if found != expected {
        return Err(ProtocolError::BadMagic { found, expected });
    }
    Ok(())
}

/// Header of one option sent by the client (after the IHAVEOPT magic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number.
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Encodes magic, option and length.
    pub fn encode(&self) -> [u8; 16] {
        header(|w| {
            w.put_u64(IHAVEOPT);
            w.put_u32(self.option);
            w.put_u32(self.length);
        })
    }
    /// Decodes and checks the magic.
    pub fn decode(b: &[u8; 16]) -> Result<Self, ProtocolError> {
        let mut r = &b[..];
        check_magic(r.get_u64(), IHAVEOPT)?;
        Ok(OptionHeader {
            option: r.get_u32(),
            length: r.get_u32(),
        })
    }
}

/// Header of one option reply sent by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this answers.
    pub option: u32,
    /// Reply type (`NBD_REP_*`).
    pub reply: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; OPTION_REPLY_LEN] {
        header(|w| {
            w.put_u64(REP_MAGIC);
            w.put_u32(self.option);
            w.put_u32(self.reply);
            w.put_u32(self.length);
        })
    }
    /// Decodes and checks the magic.
    pub fn decode(b: &[u8; OPTION_REPLY_LEN]) -> Result<Self, ProtocolError> {
        let mut r = &b[..];
        check_magic(r.get_u64(), REP_MAGIC)?;
        Ok(OptionReplyHeader {
            option: r.get_u32(),
            reply: r.get_u32(),
            length: r.get_u32(),
        })
    }
    /// Whether the reply type is an error.
    pub fn is_error(&self) -> bool {
        self.reply & NBD_REP_FLAG_ERROR != 0
    }
}

/// Data of `NBD_OPT_GO` / `NBD_OPT_INFO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoOption {
    /// Export name.
    pub name: String,
    /// Info items requested.
    pub info: Vec<u16>,
}

impl GoOption {
    /// Encodes the option data.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(6 + self.name.len() + 2 * self.info.len());
        v.put_u32(self.name.len() as u32);
        v.put_slice(self.name.as_bytes());
        v.put_u16(self.info.len() as u16);
        self.info.iter().for_each(|&i| v.put_u16(i));
        v
    }
    /// Decodes the option data.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = reader(buf, "go option");
        let nl = r.u32()? as usize;
        let name = r.string(nl)?;
        let n = r.u16()?;
        let mut info = Vec::with_capacity(n as usize);
        for _ in 0..n {
            info.push(r.u16()?);
        }
        r.finish()?;
        Ok(GoOption { name, info })
    }
}

/// Encodes the `NBD_INFO_EXPORT` item.
pub fn encode_info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.put_u16(NBD_INFO_EXPORT);
    v.put_u64(size);
    v.put_u16(flags);
    v
}

/// Encodes the `NBD_INFO_BLOCK_SIZE` item.
pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.put_u16(NBD_INFO_BLOCK_SIZE);
    [min, preferred, max].into_iter().for_each(|n| v.put_u32(n));
    v
}

/// Encodes an `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION` item (the text is cut to
/// [`MAX_STRING_LEN`] bytes at a character boundary).
pub fn encode_info_string(item: u16, text: &str) -> Vec<u8> {
    let mut end = text.len().min(MAX_STRING_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut v = Vec::with_capacity(2 + end);
    v.put_u16(item);
    v.put_slice(&text.as_bytes()[..end]);
    v
}

/// An `NBD_REP_INFO` item as seen by a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoItem {
    /// Export size and transmission flags.
    Export {
        /// Size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// Block size constraints.
    BlockSize {
        /// Minimum.
        min: u32,
        /// Preferred.
        preferred: u32,
        /// Maximum request payload.
        max: u32,
    },
    /// The export's canonical name.
    Name(String),
    /// The export's description.
    Description(String),
    /// Granted lease.
    Lease {
        /// Granted state.
        state: RequestedState,
        /// Current epoch.
        epoch: u64,
    },
    /// Something this code does not interpret.
    Other(u16),
}

impl InfoItem {
    /// Decodes an info item.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = reader(buf, "info item");
        let item = match r.u16()? {
            NBD_INFO_EXPORT => InfoItem::Export {
                size: r.u64()?,
                flags: r.u16()?,
            },
            NBD_INFO_BLOCK_SIZE => InfoItem::BlockSize {
                min: r.u32()?,
                preferred: r.u32()?,
                max: r.u32()?,
            },
            kind @ (NBD_INFO_NAME | NBD_INFO_DESCRIPTION) => {
                let text = r.string(buf.len() - 2)?;
                match kind {
                    NBD_INFO_NAME => InfoItem::Name(text),
                    _ => InfoItem::Description(text),
                }
            }
            NBD_INFO_LEASE => InfoItem::Lease {
                state: RequestedState::from_wire(r.u8()?)?,
                epoch: r.u64()?,
            },
            other => return Ok(InfoItem::Other(other)),
        };
        r.finish()?;
        Ok(item)
    }
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`NBD_CMD_*`).
    pub kind: u16,
    /// Client's handle, echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl Request {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        header(|w| {
            put_command(w, REQUEST_MAGIC, self.flags, self.kind, self.handle);
            w.put_u64(self.offset);
            w.put_u32(self.length);
        })
    }
    /// Decodes and checks the magic.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Self, ProtocolError> {
        let mut r = &b[..];
        let (flags, kind, handle) = get_command(&mut r, REQUEST_MAGIC)?;
        let (offset, length) = (r.get_u64(), r.get_u32());
        Ok(Request {
            flags,
            kind,
            handle,
            offset,
            length,
        })
    }
}

/// Encodes a simple reply header.
pub fn encode_simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    header(|w| {
        w.put_u32(SIMPLE_REPLY_MAGIC);
        w.put_u32(error);
        w.put_u64(handle);
    })
}

/// Decodes a simple reply header into (error, handle).
pub fn decode_simple_reply(b: &[u8; SIMPLE_REPLY_LEN]) -> Result<(u32, u64), ProtocolError> {
    let mut r = &b[..];
    check_magic(r.get_u32(), SIMPLE_REPLY_MAGIC)?;
    Ok((r.get_u32(), r.get_u64()))
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `NBD_REPLY_FLAG_*`.
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`.
    pub kind: u16,
    /// Request handle.
    pub handle: u64,
    /// Payload length.
    pub length: u32,
}

impl ChunkHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; STRUCTURED_HEADER_LEN] {
        header(|w| {
            put_command(
                w,
                STRUCTURED_REPLY_MAGIC,
                self.flags,
                self.kind,
                self.handle,
            );
            w.put_u32(self.length);
        })
    }
    /// Decodes and checks the magic.
    pub fn decode(b: &[u8; STRUCTURED_HEADER_LEN]) -> Result<Self, ProtocolError> {
        let mut r = &b[..];
        let (flags, kind, handle) = get_command(&mut r, STRUCTURED_REPLY_MAGIC)?;
        let length = r.get_u32();
        Ok(ChunkHeader {
            flags,
            kind,
            handle,
            length,
        })
    }
}

/// Encodes an `NBD_REPLY_TYPE_ERROR` payload.
pub fn encode_error_chunk(error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    let mut v = Vec::with_capacity(6 + msg.len());
    v.put_u32(error);
    v.put_u16(msg.len() as u16);
    v.put_slice(msg);
    v
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_master_hint_is_read_from_a_not_master_refusal() {
        let hint = crate::cluster::MasterHint {
            node: "node-b".into(),
            nbd: "10.0.0.2:10809".into(),
            api: "10.0.0.2:10810".into(),
        };
        let msg = format!("this node is not the master of volume v; {hint}");
        assert_eq!(master_hint(&msg), Some("10.0.0.2:10809"));
        assert_eq!(master_hint("this node is not the master of volume v"), None);
        assert_eq!(master_hint("[master-nbd=]"), None);
        assert_eq!(master_hint("[master-nbd=10.0.0.2:1"), None);
    }

    use super::*;

    fn lease() -> LeaseOption {
        LeaseOption {
            host: "host-a".into(),
            instance: "vm-1".into(),
            state: RequestedState::Standby,
            expected_epoch: 7,
        }
    }

    #[test]
    fn lease_option_round_trip() {
        let l = lease();
        assert_eq!(LeaseOption::decode(&l.encode()).unwrap(), l);
    }

    #[test]
    fn lease_option_malformed() {
        let good = lease().encode();
        for cut in 0..good.len() {
            assert!(LeaseOption::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut v = good.clone();
        v[1] = 2;
        assert_eq!(LeaseOption::decode(&v), Err(ProtocolError::Version(2)));
        let mut v = good.clone();
        v[2] = 9;
        assert!(LeaseOption::decode(&v).is_err());
        let mut v = good.clone();
        v[3] = 1;
        assert!(LeaseOption::decode(&v).is_err());
        let mut v = good.clone();
        v.push(0);
        assert!(LeaseOption::decode(&v).is_err());
        let empty = LeaseOption {
            host: String::new(),
            ..lease()
        };
        assert!(LeaseOption::decode(&empty.encode()).is_err());
        let mut v = good;
        v[14] = 0xff; // invalid UTF-8 inside the host id
        assert!(LeaseOption::decode(&v).is_err());
    }

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r = Request {
            flags: NBD_CMD_FLAG_FUA,
            kind: NBD_CMD_WRITE,
            handle: 0xdead_beef,
            offset: 1 << 40,
            length: 4096,
        };
        let b = r.encode();
        assert_eq!(Request::decode(&b).unwrap(), r);
        let mut bad = b;
        bad[0] = 0;
        assert!(matches!(
            Request::decode(&bad),
            Err(ProtocolError::BadMagic { .. })
        ));
    }

    #[test]
    fn option_headers_round_trip() {
        let h = OptionHeader {
            option: NBD_OPT_LEASE,
            length: 12,
        };
        assert_eq!(OptionHeader::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[7] ^= 1;
        assert!(OptionHeader::decode(&bad).is_err());
        let r = OptionReplyHeader {
            option: NBD_OPT_GO,
            reply: NBD_REP_ERR_LEASE_DEACTIVATED,
            length: 3,
        };
        let d = OptionReplyHeader::decode(&r.encode()).unwrap();
        assert_eq!(d, r);
        assert!(d.is_error());
    }

    #[test]
    fn go_option_round_trip_and_malformed() {
        let g = GoOption {
            name: "vol".into(),
            info: vec![NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT],
        };
        let b = g.encode();
        assert_eq!(GoOption::decode(&b).unwrap(), g);
        for cut in 0..b.len() {
            assert!(GoOption::decode(&b[..cut]).is_err());
        }
        // A name length far beyond the data must not allocate or panic.
        let mut huge = b.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(GoOption::decode(&huge).is_err());
    }

    #[test]
    fn info_items_round_trip() {
        assert_eq!(
            InfoItem::decode(&encode_info_export(1 << 30, NBD_FLAG_HAS_FLAGS)).unwrap(),
            InfoItem::Export {
                size: 1 << 30,
                flags: NBD_FLAG_HAS_FLAGS
            }
        );
        assert_eq!(
            InfoItem::decode(&encode_info_block_size(1, 4096, MAX_REQUEST_LEN)).unwrap(),
            InfoItem::BlockSize {
                min: 1,
                preferred: 4096,
                max: MAX_REQUEST_LEN
            }
        );
        assert_eq!(
            InfoItem::decode(&encode_info_lease(RequestedState::Primary, 3)).unwrap(),
            InfoItem::Lease {
                state: RequestedState::Primary,
                epoch: 3
            }
        );
        assert!(InfoItem::decode(&[0, 0, 1]).is_err());
        assert_eq!(
            InfoItem::decode(&encode_info_string(NBD_INFO_NAME, "vol")).unwrap(),
            InfoItem::Name("vol".into())
        );
        let long = "é".repeat(MAX_STRING_LEN);
        let item = encode_info_string(NBD_INFO_DESCRIPTION, &long);
        assert_eq!(item.len(), 2 + MAX_STRING_LEN);
        assert!(matches!(
            InfoItem::decode(&item),
            Ok(InfoItem::Description(_))
        ));
    }

    #[test]
    fn replies_round_trip() {
        let b = encode_simple_reply(NBD_EPERM, 42);
        assert_eq!(decode_simple_reply(&b).unwrap(), (NBD_EPERM, 42));
        let c = ChunkHeader {
            flags: NBD_REPLY_FLAG_DONE,
            kind: NBD_REPLY_TYPE_OFFSET_DATA,
            handle: 9,
            length: 100,
        };
        assert_eq!(ChunkHeader::decode(&c.encode()).unwrap(), c);
        let mut bad = c.encode();
        bad[1] = 0;
        assert!(ChunkHeader::decode(&bad).is_err());
        let e = encode_error_chunk(NBD_EINVAL, "bad");
        assert_eq!(e, [0, 0, 0, 22, 0, 3, b'b', b'a', b'd']);
    }

    #[test]
    fn flip_report_round_trip() {
        let r = FlipReport {
            epoch: 4,
            deactivate_us: 1,
            drain_us: 2,
            disconnect_us: 3,
            persist_us: 400,
            promote_us: 5,
            total_us: 411,
            drained_requests: 6,
        };
        assert_eq!(FlipReport::decode(&r.encode()).unwrap(), r);
        assert!(FlipReport::decode(&r.encode()[..63]).is_err());
    }
}
