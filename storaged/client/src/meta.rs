//! Metadata contexts and block status: which parts of an export hold data, so that clients copy
//! and map volumes without reading their holes.
//!
//! # Negotiation
//! After `NBD_OPT_STRUCTURED_REPLY`, a client lists ([`NBD_OPT_LIST_META_CONTEXT`]) or selects
//! ([`NBD_OPT_SET_META_CONTEXT`]) metadata contexts of one export. Both options carry:
//! ```text
//! u32 export name length, export name
//! u32 number of queries, then per query: u32 length, query (UTF-8)
//! ```
//! The server answers one `NBD_REP_META_CONTEXT` (`u32 context id`, context name) per context
//! that matches, then `NBD_REP_ACK`. storaged serves one context, [`BASE_ALLOCATION`], under the
//! id [`BASE_ALLOCATION_ID`]. `LIST` with no query, or with the namespace query `base:`, lists
//! it; `SET` selects exact names only and ignores the ones it does not serve. `SET` without
//! structured replies is refused with `NBD_REP_ERR_INVALID`. A selection holds for the export it
//! names (`NBD_OPT_GO` of another export drops it) and is forgotten by `NBD_OPT_STARTTLS`.
//!
//! # Block status
//! ```text
//! C: NBD_CMD_BLOCK_STATUS  offset, length  [flag NBD_CMD_FLAG_REQ_ONE]
//! S: BLOCK_STATUS chunk: u32 context id, then (u32 length, u32 flags) extents
//! ```
//! The extents describe the range from `offset` on, in order, without gaps, and never beyond the
//! request; they may cover less than all of it (at most [`MAX_EXTENTS`], one with `REQ_ONE`).
//! Flags of `base:allocation`: [`NBD_STATE_HOLE`] (not allocated) and [`NBD_STATE_ZERO`] (reads
//! as zeroes). A client that selected no context gets `EINVAL`.
//!
//! # Version policy
//! As the upstream NBD specification; the context ids are the server's choice per connection.

use crate::protocol::{reader, ProtocolError, MAX_STRING_LEN};
use bytes::BufMut;

/// Option: list the metadata contexts matching some queries (see [`crate::meta`]).
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select the metadata contexts `NBD_CMD_BLOCK_STATUS` reports.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Option reply: one metadata context (`u32 id`, name).
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Command: report the state of a range in the selected metadata contexts.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
/// Command flag: BLOCK_STATUS wants one extent per context only.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Structured chunk: `u32 context id` then `(u32 length, u32 flags)` extents.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;

/// The allocation context every NBD server may serve.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The query that lists every context of the `base` namespace.
pub const BASE_NAMESPACE: &str = "base:";
/// The id storaged gives [`BASE_ALLOCATION`].
pub const BASE_ALLOCATION_ID: u32 = 1;
/// `base:allocation` flag: the extent is not allocated.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;
/// Most extents in one block status reply.
pub const MAX_EXTENTS: usize = 1024;

/// Data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextOption {
    /// The export the contexts are for.
    pub export: String,
    /// The queries (context names, or namespaces ending in ':' to list).
    pub queries: Vec<String>,
}

impl MetaContextOption {
    /// Encodes the option data.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u32(self.export.len() as u32);
        v.put_slice(self.export.as_bytes());
        v.put_u32(self.queries.len() as u32);
        for q in &self.queries {
            v.put_u32(q.len() as u32);
            v.put_slice(q.as_bytes());
        }
        v
    }

    /// Decodes the option data.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = reader(buf, "meta context option");
        let export = string(&mut r)?;
        let n = r.u32()?;
        // Each query takes at least its length field: no count can claim more than the data.
        let mut queries = Vec::with_capacity((n as usize).min(buf.len() / 4));
        for _ in 0..n {
            queries.push(string(&mut r)?);
        }
        r.finish()?;
        Ok(MetaContextOption { export, queries })
    }
}

/// A `u32`-length-prefixed string of at most [`MAX_STRING_LEN`] bytes.
fn string(r: &mut crate::protocol::Reader<'_>) -> Result<String, ProtocolError> {
    let len = r.u32()? as usize;
    if len > MAX_STRING_LEN {
        return Err(ProtocolError::Invalid("string too long"));
    }
    r.string(len)
}

/// Whether `query` names or lists [`BASE_ALLOCATION`] in the given option (`LIST` also takes
/// the namespace).
pub fn matches_base_allocation(option: u32, query: &str) -> bool {
    query == BASE_ALLOCATION || (option == NBD_OPT_LIST_META_CONTEXT && query == BASE_NAMESPACE)
}

/// Encodes an `NBD_REP_META_CONTEXT` payload.
pub fn encode_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.put_u32(id);
    v.put_slice(name.as_bytes());
    v
}

/// One extent of a block status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes it covers (never 0).
    pub length: u32,
    /// The context's flags for it.
    pub flags: u32,
}

/// The payload of an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatus {
    /// The context id the extents are in.
    pub context: u32,
    /// The extents, from the request's offset on.
    pub extents: Vec<Extent>,
}

impl BlockStatus {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(4 + 8 * self.extents.len());
        v.put_u32(self.context);
        for e in &self.extents {
            v.put_u32(e.length);
            v.put_u32(e.flags);
        }
        v
    }

    /// Decodes a payload: at least one extent, none empty.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = reader(buf, "block status");
        let context = r.u32()?;
        if buf.len() < 12 || !(buf.len() - 4).is_multiple_of(8) {
            return Err(ProtocolError::Invalid("block status length"));
        }
        let mut extents = Vec::with_capacity((buf.len() - 4) / 8);
        while extents.len() < extents.capacity() {
            let e = Extent {
                length: r.u32()?,
                flags: r.u32()?,
            };
            if e.length == 0 {
                return Err(ProtocolError::Invalid("empty extent"));
            }
            extents.push(e);
        }
        Ok(BlockStatus { context, extents })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_context_option_round_trip_and_malformed() {
        let o = MetaContextOption {
            export: "vol".into(),
            queries: vec![BASE_ALLOCATION.into(), "qemu:dirty-bitmap:x".into()],
        };
        let b = o.encode();
        assert_eq!(MetaContextOption::decode(&b).unwrap(), o);
        for cut in 0..b.len() {
            assert!(MetaContextOption::decode(&b[..cut]).is_err(), "cut {cut}");
        }
        // A query count far beyond the data neither allocates nor panics.
        let mut huge = b.clone();
        huge[7..11].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(MetaContextOption::decode(&huge).is_err());
        let none = MetaContextOption {
            export: String::new(),
            queries: vec![],
        };
        assert_eq!(MetaContextOption::decode(&none.encode()).unwrap(), none);
    }

    #[test]
    fn queries_that_match_base_allocation() {
        for opt in [NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT] {
            assert!(matches_base_allocation(opt, BASE_ALLOCATION));
            assert!(!matches_base_allocation(opt, "base:allocation2"));
            assert!(!matches_base_allocation(opt, "qemu:allocation-depth"));
        }
        assert!(matches_base_allocation(NBD_OPT_LIST_META_CONTEXT, "base:"));
        assert!(!matches_base_allocation(NBD_OPT_SET_META_CONTEXT, "base:"));
    }

    #[test]
    fn block_status_round_trip_and_malformed() {
        let s = BlockStatus {
            context: BASE_ALLOCATION_ID,
            extents: vec![
                Extent {
                    length: 4096,
                    flags: 0,
                },
                Extent {
                    length: 1 << 20,
                    flags: NBD_STATE_HOLE | NBD_STATE_ZERO,
                },
            ],
        };
        let b = s.encode();
        assert_eq!(BlockStatus::decode(&b).unwrap(), s);
        assert!(BlockStatus::decode(&b[..4]).is_err(), "no extent");
        assert!(BlockStatus::decode(&b[..15]).is_err(), "half an extent");
        let mut empty = b.clone();
        empty[4..8].copy_from_slice(&[0; 4]);
        assert!(BlockStatus::decode(&empty).is_err());
        assert_eq!(
            encode_meta_context(7, BASE_ALLOCATION)[..4],
            7u32.to_be_bytes()
        );
    }
}
