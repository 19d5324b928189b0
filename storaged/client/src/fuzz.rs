//! Entry points for the fuzzer: each takes bytes another party could send and runs them
//! through the parser that reads them, checking what must hold for any input (no panic, frames
//! that add up, round trips of what decoded). The cargo-fuzz targets in `storaged/client/fuzz`
//! call these, and so does this crate's test suite for every file of their checked-in corpora
//! (`fuzz/corpus/<target>/`), on the stable toolchain.
//!
//! | target | bytes from | parser |
//! |---|---|---|
//! | [`handshake_options`] | a client, in the handshake | [`OptionHeader`], [`ClientOption`] |
//! | [`requests`] | a client, in transmission | [`RequestDecoder`] |
//! | [`lease_option`] | a client, the lease option's data | [`LeaseOption`] |
//! | [`replies`] | a server | [`ReplyDecoder`], [`OptionReplyHeader`], [`InfoItem`], [`BlockStatus`] |

use crate::codec::{ReplyDecoder, ReplyFrame, RequestDecoder, RequestFrame};
use crate::meta::{BlockStatus, NBD_REPLY_TYPE_BLOCK_STATUS};
use crate::option::ClientOption;
use crate::protocol::*;
use bytes::BytesMut;
use tokio_util::codec::Decoder;

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// The fuzz targets by name, for the corpus regression test.
pub const TARGETS: [(&str, Target); 4] = [
    ("handshake_options", handshake_options),
    ("requests", requests),
    ("lease_option", lease_option),
    ("replies", replies),
];

/// The options of a handshake, split and decoded as the server does: each decoded option that
/// carries data encodes back to the same data.
pub fn handshake_options(data: &[u8]) {
    let mut rest = data;
    while rest.len() >= 16 {
        let header: &[u8; 16] = rest[..16].try_into().expect("16 bytes");
        let Ok(h) = OptionHeader::decode(header) else {
            return;
        };
        rest = &rest[16..];
        if h.length > MAX_OPTION_LEN || h.length as usize > rest.len() {
            return;
        }
        let (body, tail) = rest.split_at(h.length as usize);
        rest = tail;
        match ClientOption::decode(h.option, body) {
            Ok(ClientOption::Go(g) | ClientOption::Info(g)) => assert_eq!(g.encode(), body),
            Ok(ClientOption::ListMetaContext(m) | ClientOption::SetMetaContext(m)) => {
                assert_eq!(m.encode(), body)
            }
            Ok(ClientOption::Lease(l)) => assert_eq!(l.encode(), body),
            Ok(ClientOption::ExportName(name)) => assert_eq!(name.as_bytes(), body),
            Ok(_) | Err(_) => {}
        }
    }
}

/// Cuts `data` into the pieces a socket might deliver: the first byte picks their size.
fn pieces(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let (size, rest) = match data.split_first() {
        Some((&b, rest)) => (usize::from(b).max(1) * 7, rest),
        None => (1, data),
    };
    rest.chunks(size)
}

/// The transmission stream from a client, through the server's decoder in pieces: every
/// write's data is as long as its request says, and nothing is yielded that was not sent.
pub fn requests(data: &[u8]) {
    let mut decoder = RequestDecoder::new();
    let mut buf = BytesMut::new();
    let mut pending_write: Option<u32> = None;
    let mut check = |frame: RequestFrame| match frame {
        RequestFrame::Request(r) if r.kind == NBD_CMD_WRITE => {
            assert!(r.length <= MAX_REQUEST_LEN);
            pending_write = Some(r.length);
        }
        RequestFrame::Request(r) => assert!(r.kind != NBD_CMD_WRITE),
        RequestFrame::WriteData(d) => {
            assert_eq!(pending_write.take(), Some(d.len() as u32));
        }
        RequestFrame::Oversize(r) => assert!(r.length > MAX_REQUEST_LEN),
    };
    for chunk in pieces(data) {
        buf.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => check(frame),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    while let Ok(Some(frame)) = decoder.decode_eof(&mut buf) {
        check(frame);
    }
}

/// The lease option's data: what decodes is canonical (encodes back to the same bytes).
pub fn lease_option(data: &[u8]) {
    if let Ok(l) = LeaseOption::decode(data) {
        assert_eq!(l.encode(), data);
        assert!(!l.host.is_empty() && l.host.len() <= MAX_ID_LEN);
    }
}

/// Bytes from a server: the first byte chooses the handshake's option replies (with their
/// info items) or the transmission phase's replies, simple or structured, through the client's
/// decoders; chunk payloads go through their own decoders.
pub fn replies(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        return option_replies(rest);
    }
    let structured = mode & 2 != 0;
    // A handle's read length comes from its low bits: some handles are not in flight.
    let data_len = |handle: u64| (!handle.is_multiple_of(5)).then_some((handle % 4096) as u32);
    let mut decoder = ReplyDecoder::new(structured, data_len);
    let mut buf = BytesMut::new();
    for chunk in pieces(rest) {
        buf.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => check_reply(frame, &data_len),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = decoder.decode_eof(&mut buf);
}

fn check_reply(frame: ReplyFrame, data_len: &impl Fn(u64) -> Option<u32>) {
    match frame {
        ReplyFrame::Simple {
            error,
            handle,
            data,
        } => match error {
            0 => assert_eq!(Some(data.len() as u32), data_len(handle)),
            _ => assert!(data.is_empty()),
        },
        ReplyFrame::Chunk { header, payload } => {
            assert_eq!(header.length as usize, payload.len());
            if header.kind == NBD_REPLY_TYPE_BLOCK_STATUS {
                if let Ok(s) = BlockStatus::decode(&payload) {
                    assert_eq!(s.encode(), payload);
                }
            }
        }
    }
}

/// Option replies as the client reads them in the handshake.
fn option_replies(data: &[u8]) {
    let mut rest = data;
    while rest.len() >= OPTION_REPLY_LEN {
        let header: &[u8; OPTION_REPLY_LEN] = rest[..OPTION_REPLY_LEN].try_into().expect("header");
        let Ok(h) = OptionReplyHeader::decode(header) else {
            return;
        };
        rest = &rest[OPTION_REPLY_LEN..];
        let Some(body) = rest.get(..h.length as usize) else {
            return;
        };
        rest = &rest[body.len()..];
        if h.reply == NBD_REP_INFO {
            let _ = InfoItem::decode(body);
        }
    }
}

vmhop_common::corpus_replay_test!(super::TARGETS, "fuzz/corpus");
