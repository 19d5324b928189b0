//! Framing of the transmission phase as `tokio_util::codec` decoders and encoders: where one
//! message on the stream ends and the next begins, on both ends of a connection.
//!
//! | end | decodes | encodes |
//! |---|---|---|
//! | server | requests: [`RequestDecoder`] yields [`RequestFrame`] | replies: [`ReplyEncoder`] takes [`Reply`] |
//! | client | replies: [`ReplyDecoder`] yields [`ReplyFrame`] | requests: [`RequestEncoder`] takes [`OutgoingRequest`] |
//!
//! The layouts of the headers are in [`crate::protocol`]; this module knows how long each message
//! is:
//! - a request is its header, followed by `length` bytes of data for `NBD_CMD_WRITE` only;
//! - a simple reply is its header, followed by the data of a read that succeeded. The header
//!   does not say how long that data is: the client's decoder asks the requests in flight;
//! - a structured reply chunk is its header followed by `length` bytes of payload.
//!
//! Limits hold before any memory is reserved for a message: a write longer than
//! [`MAX_REQUEST_LEN`] is read and dropped piece by piece and then reported as
//! [`RequestFrame::Oversize`] (the stream stays usable); a chunk longer than [`MAX_CHUNK_LEN`]
//! is a protocol error. A write's data comes as a frame of its own after its header, so that
//! the server can take the request's share of its memory budget before the data is buffered;
//! or the server receives long data itself, into a buffer of its own, and tells the decoder
//! ([`RequestDecoder::pending_data`], [`RequestDecoder::data_received`]).
//!
//! The [`Encoder`] impls write whole frames. A sender that wants long payloads to go out without
//! a copy writes the head with `encode_head` and then the frame with [`send_frame`], which is
//! how the server and the client send.
//!
//! The handshake does not go through these codecs: it is a strict one-message-at-a-time
//! dialogue, read straight from the socket, so that not one byte of the transmission phase is
//! consumed before the transmission framing takes over the stream.

use crate::meta::{BlockStatus, NBD_REPLY_TYPE_BLOCK_STATUS};
use crate::protocol::*;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};

/// Longest structured reply chunk accepted: the offset of a data chunk plus the largest read.
pub const MAX_CHUNK_LEN: u32 = MAX_REQUEST_LEN + 8;
/// Room made in the read buffer while waiting for small messages, so that one socket read takes
/// in many of them.
pub const READ_CHUNK: usize = 256 << 10;
/// Payloads at least this long move without a copy: a decoder receives them in place and hands
/// them over, a sender writes them from their own memory after the encoded head. Shorter ones
/// are copied, so that read buffers stay unshared and reused and many frames go out in one
/// write.
pub const IN_PLACE_MIN: usize = 64 << 10;

/// A stream that could not be framed.
#[derive(Debug, Error)]
pub enum CodecError {
    /// Socket error, or the stream ended inside a message.
    #[error("connection")]
    Io(#[from] std::io::Error),
    /// The bytes are not a valid message.
    #[error("protocol violation")]
    Protocol(#[from] ProtocolError),
}

/// Makes room in `src` for a message of `len` bytes (and, for short ones, a full read chunk).
fn reserve_for(src: &mut BytesMut, len: usize) {
    src.reserve(len.max(READ_CHUNK).saturating_sub(src.len()));
}

/// Takes the first `len` bytes of `src` (which holds at least that many).
fn take_payload(src: &mut BytesMut, len: usize) -> Bytes {
    if len >= IN_PLACE_MIN {
        src.split_to(len).freeze()
    } else {
        let payload = Bytes::copy_from_slice(&src[..len]);
        src.advance(len);
        payload
    }
}

/// Splits a fixed-size header off the front of `src`, if it is all there.
fn take_header<const N: usize>(src: &mut BytesMut) -> Option<[u8; N]> {
    if src.len() < N {
        reserve_for(src, N);
        return None;
    }
    let header = src[..N].try_into().expect("N bytes");
    src.advance(N);
    Some(header)
}

/// The end of the stream: fine between messages, an error inside one.
fn end_of_stream(src: &mut BytesMut, between_messages: bool) -> Result<(), CodecError> {
    if between_messages {
        // A client that hangs up in the middle of a header has said nothing yet.
        src.clear();
        Ok(())
    } else {
        Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into())
    }
}

/// What the server's decoder yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestFrame {
    /// A request. For `NBD_CMD_WRITE` (within [`MAX_REQUEST_LEN`]) its data is the next frame.
    Request(Request),
    /// The data of the write request yielded just before.
    WriteData(Bytes),
    /// A write longer than [`MAX_REQUEST_LEN`]: its data was read and dropped.
    Oversize(Request),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestState {
    Header,
    WriteData(usize),
    Discard { request: Request, left: u64 },
}

/// Server end: splits the stream from the client into [`RequestFrame`]s.
#[derive(Debug)]
pub struct RequestDecoder {
    state: RequestState,
}

impl RequestDecoder {
    /// A decoder at the start of the transmission phase.
    pub fn new() -> RequestDecoder {
        RequestDecoder {
            state: RequestState::Header,
        }
    }

    /// The length of the write data expected next, when the last frame was a write's header:
    /// the caller may then receive that data itself, straight from the stream (after the
    /// part the read buffer already holds), and tell the decoder with [`Self::data_received`].
    pub fn pending_data(&self) -> Option<usize> {
        match self.state {
            RequestState::WriteData(len) => Some(len),
            _ => None,
        }
    }

    /// The write data announced by [`Self::pending_data`] was received by the caller; the next
    /// frame is a request header.
    pub fn data_received(&mut self) {
        debug_assert!(self.pending_data().is_some());
        self.state = RequestState::Header;
    }
}

impl Default for RequestDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder for RequestDecoder {
    type Item = RequestFrame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<RequestFrame>, CodecError> {
        loop {
            match self.state {
                RequestState::Header => {
                    let Some(header) = take_header::<REQUEST_LEN>(src) else {
                        return Ok(None);
                    };
                    let request = Request::decode(&header)?;
                    if request.kind != NBD_CMD_WRITE {
                        return Ok(Some(RequestFrame::Request(request)));
                    }
                    if request.length > MAX_REQUEST_LEN {
                        let left = request.length.into();
                        self.state = RequestState::Discard { request, left };
                        continue;
                    }
                    self.state = RequestState::WriteData(request.length as usize);
                    return Ok(Some(RequestFrame::Request(request)));
                }
                RequestState::WriteData(len) => {
                    if src.len() < len {
                        reserve_for(src, len);
                        return Ok(None);
                    }
                    self.state = RequestState::Header;
                    return Ok(Some(RequestFrame::WriteData(take_payload(src, len))));
                }
                RequestState::Discard { request, left } => {
                    let n = left.min(src.len() as u64);
                    src.advance(n as usize);
                    if n < left {
                        self.state = RequestState::Discard {
                            request,
                            left: left - n,
                        };
                        reserve_for(src, 0);
                        return Ok(None);
                    }
                    self.state = RequestState::Header;
                    return Ok(Some(RequestFrame::Oversize(request)));
                }
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<RequestFrame>, CodecError> {
        if let Some(frame) = self.decode(src)? {
            return Ok(Some(frame));
        }
        end_of_stream(src, self.state == RequestState::Header)?;
        Ok(None)
    }
}

/// The data of a reply to a read-like command (`NBD_CMD_READ`, the flip's report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyData<B> {
    /// Offset of the request (a structured data chunk names it).
    pub offset: u64,
    /// The data, sent only when the reply carries no error.
    pub data: B,
}

/// What a reply carries besides its handle and error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyBody<B> {
    /// Nothing: always a simple reply.
    Status,
    /// A read-like reply's data: a structured data or error chunk when structured replies are
    /// on, else a simple reply followed by the data unless there was an error.
    Data(ReplyData<B>),
    /// `NBD_CMD_BLOCK_STATUS`: a block status chunk, or an error chunk (structured replies are
    /// always on where a client can ask for it).
    BlockStatus(BlockStatus),
}

/// A reply as the server's encoder takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply<B> {
    /// The request's handle.
    pub handle: u64,
    /// `NBD_E*`, 0 for success.
    pub error: u32,
    /// What it carries.
    pub body: ReplyBody<B>,
}

impl<B> Reply<B> {
    /// A reply without data.
    pub fn status(handle: u64, error: u32) -> Reply<B> {
        Reply {
            handle,
            error,
            body: ReplyBody::Status,
        }
    }
}

/// Server end: encodes [`Reply`]s as simple replies or, once negotiated, structured chunks.
#[derive(Debug)]
pub struct ReplyEncoder {
    structured: bool,
}

impl ReplyEncoder {
    /// An encoder for a connection that negotiated structured replies or not.
    pub fn new(structured: bool) -> ReplyEncoder {
        ReplyEncoder { structured }
    }
}

/// The header of a structured reply's only chunk.
fn last_chunk(handle: u64, kind: u16, length: usize) -> [u8; STRUCTURED_HEADER_LEN] {
    ChunkHeader {
        flags: NBD_REPLY_FLAG_DONE,
        kind,
        handle,
        length: length as u32,
    }
    .encode()
}

impl ReplyEncoder {
    /// Encodes all of `reply` up to its data into `dst` and returns the data, which must follow
    /// on the stream: a sender can write long data from its own memory instead of copying it.
    pub fn encode_head<'a, B: AsRef<[u8]>>(
        &self,
        reply: &'a Reply<B>,
        dst: &mut BytesMut,
    ) -> &'a [u8] {
        let (handle, error) = (reply.handle, reply.error);
        let structured = match &reply.body {
            ReplyBody::Status => false,
            ReplyBody::Data(_) => self.structured,
            ReplyBody::BlockStatus(_) => true,
        };
        if !structured {
            dst.put_slice(&encode_simple_reply(error, handle));
            return match &reply.body {
                ReplyBody::Data(d) if error == 0 => d.data.as_ref(),
                _ => &[],
            };
        }
        if error != 0 {
            let payload = encode_error_chunk(error, "");
            dst.put_slice(&last_chunk(handle, NBD_REPLY_TYPE_ERROR, payload.len()));
            dst.put_slice(&payload);
            return &[];
        }
        match &reply.body {
            ReplyBody::BlockStatus(status) => {
                let payload = status.encode();
                dst.put_slice(&last_chunk(
                    handle,
                    NBD_REPLY_TYPE_BLOCK_STATUS,
                    payload.len(),
                ));
                dst.put_slice(&payload);
                &[]
            }
            ReplyBody::Data(ReplyData { offset, data }) if !data.as_ref().is_empty() => {
                let data = data.as_ref();
                dst.put_slice(&last_chunk(
                    handle,
                    NBD_REPLY_TYPE_OFFSET_DATA,
                    8 + data.len(),
                ));
                dst.put_u64(*offset);
                data
            }
            _ => {
                dst.put_slice(&last_chunk(handle, NBD_REPLY_TYPE_NONE, 0));
                &[]
            }
        }
    }
}

impl<B: AsRef<[u8]>> Encoder<Reply<B>> for ReplyEncoder {
    type Error = CodecError;

    fn encode(&mut self, reply: Reply<B>, dst: &mut BytesMut) -> Result<(), CodecError> {
        let data = self.encode_head(&reply, dst);
        dst.put_slice(data);
        Ok(())
    }
}

/// A request as the client's encoder takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutgoingRequest<'a> {
    /// The header.
    pub request: Request,
    /// A write's data (`request.length` bytes); empty for every other command.
    pub payload: &'a [u8],
}

/// Client end: encodes [`OutgoingRequest`]s.
#[derive(Debug, Default)]
pub struct RequestEncoder;

impl RequestEncoder {
    /// Encodes the header of `out` into `dst` and returns its payload, which must follow on the
    /// stream (see [`ReplyEncoder::encode_head`]).
    pub fn encode_head<'a>(
        &self,
        out: OutgoingRequest<'a>,
        dst: &mut BytesMut,
    ) -> Result<&'a [u8], CodecError> {
        let expected = match out.request.kind {
            NBD_CMD_WRITE => out.request.length as usize,
            _ => 0,
        };
        if out.payload.len() != expected {
            return Err(ProtocolError::Invalid("payload length differs from the request's").into());
        }
        dst.put_slice(&out.request.encode());
        Ok(out.payload)
    }
}

impl Encoder<OutgoingRequest<'_>> for RequestEncoder {
    type Error = CodecError;

    fn encode(&mut self, out: OutgoingRequest<'_>, dst: &mut BytesMut) -> Result<(), CodecError> {
        let payload = self.encode_head(out, dst)?;
        dst.put_slice(payload);
        Ok(())
    }
}

/// Sends a frame whose head `encode_head` put into `buf`, followed by `payload`: a payload of
/// [`IN_PLACE_MIN`] bytes or more goes out from its own memory, in one vectored write with all
/// of `buf`; a shorter one is gathered into `buf`, which is written once it holds `batch` bytes
/// (0: at once) and is otherwise left for the caller to write when no more frames are ready.
pub async fn send_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut BytesMut,
    payload: &[u8],
    batch: usize,
) -> std::io::Result<()> {
    if payload.len() >= IN_PLACE_MIN {
        return w.write_all_buf(&mut (&mut *buf).chain(payload)).await;
    }
    buf.put_slice(payload);
    if buf.len() >= batch {
        w.write_all_buf(buf).await?;
    }
    Ok(())
}

/// What the client's decoder yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyFrame {
    /// A simple reply, with the data of a read that succeeded (empty otherwise).
    Simple {
        /// `NBD_E*`, 0 for success.
        error: u32,
        /// The request's handle.
        handle: u64,
        /// The read's data.
        data: Bytes,
    },
    /// One structured reply chunk.
    Chunk {
        /// Its header.
        header: ChunkHeader,
        /// Its payload (`header.length` bytes).
        payload: Bytes,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyState {
    Header,
    SimpleData { error: u32, handle: u64, len: usize },
    ChunkPayload(ChunkHeader),
}

/// Client end: splits the stream from the server into [`ReplyFrame`]s.
///
/// A simple reply does not carry the length of its data: `data_len(handle)` gives the length
/// the request with that handle reads (0 for commands without data), or `None` for a handle
/// that is not in flight, which is a protocol error.
pub struct ReplyDecoder<F> {
    data_len: F,
    structured: bool,
    state: ReplyState,
}

impl<F> std::fmt::Debug for ReplyDecoder<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyDecoder")
            .field("structured", &self.structured)
            .field("state", &self.state)
            .finish()
    }
}

impl<F: FnMut(u64) -> Option<u32>> ReplyDecoder<F> {
    /// A decoder for a connection that negotiated structured replies or not (without them a
    /// structured chunk is a bad magic).
    pub fn new(structured: bool, data_len: F) -> ReplyDecoder<F> {
        ReplyDecoder {
            data_len,
            structured,
            state: ReplyState::Header,
        }
    }

    fn header(&mut self, src: &mut BytesMut) -> Result<Option<ReplyState>, CodecError> {
        if src.len() < 4 {
            reserve_for(src, SIMPLE_REPLY_LEN);
            return Ok(None);
        }
        let magic = u32::from_be_bytes(src[..4].try_into().expect("4 bytes"));
        if self.structured && magic == STRUCTURED_REPLY_MAGIC {
            let Some(h) = take_header::<STRUCTURED_HEADER_LEN>(src) else {
                return Ok(None);
            };
            let header = ChunkHeader::decode(&h)?;
            if header.length > MAX_CHUNK_LEN {
                return Err(ProtocolError::Invalid("structured reply chunk too long").into());
            }
            return Ok(Some(ReplyState::ChunkPayload(header)));
        }
        let Some(h) = take_header::<SIMPLE_REPLY_LEN>(src) else {
            return Ok(None);
        };
        let (error, handle) = decode_simple_reply(&h)?;
        let len = match error {
            0 => (self.data_len)(handle)
                .ok_or(ProtocolError::Invalid("reply for an unknown handle"))?,
            _ => 0,
        };
        Ok(Some(ReplyState::SimpleData {
            error,
            handle,
            len: len as usize,
        }))
    }
}

impl<F: FnMut(u64) -> Option<u32>> Decoder for ReplyDecoder<F> {
    type Item = ReplyFrame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ReplyFrame>, CodecError> {
        if self.state == ReplyState::Header {
            match self.header(src)? {
                Some(next) => self.state = next,
                None => return Ok(None),
            }
        }
        let len = match self.state {
            ReplyState::Header => unreachable!("a header was just decoded"),
            ReplyState::SimpleData { len, .. } => len,
            ReplyState::ChunkPayload(h) => h.length as usize,
        };
        if src.len() < len {
            reserve_for(src, len);
            return Ok(None);
        }
        let payload = take_payload(src, len);
        let frame = match std::mem::replace(&mut self.state, ReplyState::Header) {
            ReplyState::SimpleData { error, handle, .. } => ReplyFrame::Simple {
                error,
                handle,
                data: payload,
            },
            ReplyState::ChunkPayload(header) => ReplyFrame::Chunk { header, payload },
            ReplyState::Header => unreachable!("a header was just decoded"),
        };
        Ok(Some(frame))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<ReplyFrame>, CodecError> {
        if let Some(frame) = self.decode(src)? {
            return Ok(Some(frame));
        }
        end_of_stream(src, self.state == ReplyState::Header && src.is_empty())?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn request(kind: u16, handle: u64, length: u32) -> Request {
        Request {
            flags: 0,
            kind,
            handle,
            offset: 4096,
            length,
        }
    }

    fn encode_request(buf: &mut BytesMut, request: Request, payload: &[u8]) {
        RequestEncoder
            .encode(OutgoingRequest { request, payload }, buf)
            .unwrap();
    }

    /// Feeds `bytes` to `decoder` one at a time and collects every frame.
    fn trickle<D: Decoder>(decoder: &mut D, bytes: &[u8]) -> Result<Vec<D::Item>, D::Error> {
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for &b in bytes {
            buf.put_u8(b);
            while let Some(f) = decoder.decode(&mut buf)? {
                frames.push(f);
            }
        }
        Ok(frames)
    }

    fn decode_all<D: Decoder>(decoder: &mut D, buf: &mut BytesMut) -> Vec<D::Item>
    where
        D::Error: std::fmt::Debug,
    {
        std::iter::from_fn(|| decoder.decode(buf).unwrap()).collect()
    }

    #[test]
    fn requests_in_one_buffer_and_byte_by_byte() {
        let mut buf = BytesMut::new();
        let write = request(NBD_CMD_WRITE, 1, 5);
        let read = request(NBD_CMD_READ, 2, 1 << 20);
        let big = request(NBD_CMD_WRITE, 3, IN_PLACE_MIN as u32);
        let big_data = vec![7u8; IN_PLACE_MIN];
        encode_request(&mut buf, write, b"hello");
        encode_request(&mut buf, read, &[]);
        encode_request(&mut buf, big, &big_data);
        let expected = vec![
            RequestFrame::Request(write),
            RequestFrame::WriteData(Bytes::from_static(b"hello")),
            RequestFrame::Request(read),
            RequestFrame::Request(big),
            RequestFrame::WriteData(Bytes::from(big_data)),
        ];
        let bytes = buf.to_vec();
        assert_eq!(decode_all(&mut RequestDecoder::new(), &mut buf), expected);
        assert!(buf.is_empty());
        assert_eq!(
            trickle(&mut RequestDecoder::new(), &bytes).unwrap(),
            expected
        );
    }

    #[test]
    fn write_data_received_by_the_caller_puts_the_stream_in_step() {
        let write = request(NBD_CMD_WRITE, 1, 8);
        let next = request(NBD_CMD_FLUSH, 2, 0);
        let mut buf = BytesMut::new();
        encode_request(&mut buf, write, b"abcdefgh");
        encode_request(&mut buf, next, &[]);
        let mut d = RequestDecoder::new();
        assert_eq!(d.pending_data(), None);
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Some(RequestFrame::Request(write))
        );
        assert_eq!(d.pending_data(), Some(8));
        // The caller takes the data from the buffer (and would read the rest from the stream).
        assert_eq!(&buf.split_to(8)[..], b"abcdefgh");
        d.data_received();
        assert_eq!(d.pending_data(), None);
        assert_eq!(
            decode_all(&mut d, &mut buf),
            vec![RequestFrame::Request(next)]
        );
    }

    #[test]
    fn oversize_write_is_drained_without_buffering_it() {
        let len = MAX_REQUEST_LEN + 1;
        let over = request(NBD_CMD_WRITE, 9, len);
        let mut d = RequestDecoder::new();
        let mut buf = BytesMut::from(&over.encode()[..]);
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        // The data arrives in pieces; none of it is kept.
        let piece = vec![0xcdu8; 1 << 20];
        let mut left = len as usize;
        while left > piece.len() {
            buf.put_slice(&piece);
            assert_eq!(d.decode(&mut buf).unwrap(), None);
            assert!(buf.is_empty() && buf.capacity() < 2 * READ_CHUNK + piece.len());
            left -= piece.len();
        }
        // The last piece and the next request in one read: the stream is in step again.
        buf.put_slice(&piece[..left]);
        let next = request(NBD_CMD_FLUSH, 10, 0);
        buf.put_slice(&next.encode());
        assert_eq!(
            decode_all(&mut d, &mut buf),
            vec![RequestFrame::Oversize(over), RequestFrame::Request(next)]
        );
    }

    #[test]
    fn bad_request_magic_is_a_protocol_error() {
        let mut buf = BytesMut::from(&request(NBD_CMD_READ, 1, 512).encode()[..]);
        buf[0] ^= 0xff;
        assert!(matches!(
            RequestDecoder::new().decode(&mut buf),
            Err(CodecError::Protocol(ProtocolError::BadMagic { .. }))
        ));
    }

    #[test]
    fn end_of_stream_inside_a_write_is_an_error() {
        let mut d = RequestDecoder::new();
        let mut buf = BytesMut::new();
        // Between requests, and in the middle of a header: a clean end.
        assert_eq!(d.decode_eof(&mut buf).unwrap(), None);
        buf.put_slice(&request(NBD_CMD_READ, 1, 512).encode()[..10]);
        assert_eq!(d.decode_eof(&mut buf).unwrap(), None);
        // In the middle of a write's data: an error.
        encode_request(&mut buf, request(NBD_CMD_WRITE, 2, 4), b"abcd");
        buf.truncate(REQUEST_LEN + 2);
        assert!(matches!(
            d.decode(&mut buf),
            Ok(Some(RequestFrame::Request(_)))
        ));
        assert!(matches!(d.decode_eof(&mut buf), Err(CodecError::Io(_))));
    }

    /// The server's replies decoded by the client's decoder.
    fn replies(structured: bool, replies: Vec<Reply<Vec<u8>>>) -> Vec<ReplyFrame> {
        let mut lens: HashMap<u64, u32> = HashMap::new();
        let mut buf = BytesMut::new();
        let mut e = ReplyEncoder::new(structured);
        for r in replies {
            let len = match &r.body {
                ReplyBody::Data(d) => d.data.len() as u32,
                _ => 0,
            };
            lens.insert(r.handle, len);
            e.encode(r, &mut buf).unwrap();
        }
        let bytes = buf.to_vec();
        let mut d = ReplyDecoder::new(structured, |h| lens.get(&h).copied());
        let frames = decode_all(&mut d, &mut buf);
        assert!(buf.is_empty());
        let mut d = ReplyDecoder::new(structured, |h| lens.get(&h).copied());
        assert_eq!(trickle(&mut d, &bytes).unwrap(), frames, "byte by byte");
        frames
    }

    fn read_reply(handle: u64, error: u32, data: &[u8]) -> Reply<Vec<u8>> {
        Reply {
            handle,
            error,
            body: ReplyBody::Data(ReplyData {
                offset: 512,
                data: data.to_vec(),
            }),
        }
    }

    #[test]
    fn simple_replies_round_trip() {
        let big = vec![3u8; IN_PLACE_MIN + 1];
        let frames = replies(
            false,
            vec![
                Reply::status(1, 0),
                read_reply(2, 0, b"data"),
                read_reply(3, NBD_EIO, b"not sent"),
                Reply::status(4, NBD_EPERM),
                read_reply(5, 0, &big),
            ],
        );
        let simple = |handle, error, data: &[u8]| ReplyFrame::Simple {
            error,
            handle,
            data: Bytes::copy_from_slice(data),
        };
        assert_eq!(
            frames,
            vec![
                simple(1, 0, b""),
                simple(2, 0, b"data"),
                simple(3, NBD_EIO, b""),
                simple(4, NBD_EPERM, b""),
                simple(5, 0, &big),
            ]
        );
    }

    #[test]
    fn structured_replies_round_trip() {
        let frames = replies(
            true,
            vec![
                Reply::status(1, NBD_EPERM),
                read_reply(2, 0, b"data"),
                read_reply(3, NBD_EIO, b"not sent"),
                read_reply(4, 0, b""),
            ],
        );
        let chunk = |handle, kind, payload: &[u8]| ReplyFrame::Chunk {
            header: ChunkHeader {
                flags: NBD_REPLY_FLAG_DONE,
                kind,
                handle,
                length: payload.len() as u32,
            },
            payload: Bytes::copy_from_slice(payload),
        };
        let mut offset_data = 512u64.to_be_bytes().to_vec();
        offset_data.extend_from_slice(b"data");
        assert_eq!(
            frames,
            vec![
                ReplyFrame::Simple {
                    error: NBD_EPERM,
                    handle: 1,
                    data: Bytes::new()
                },
                chunk(2, NBD_REPLY_TYPE_OFFSET_DATA, &offset_data),
                chunk(3, NBD_REPLY_TYPE_ERROR, &encode_error_chunk(NBD_EIO, "")),
                chunk(4, NBD_REPLY_TYPE_NONE, b""),
            ]
        );
    }

    #[test]
    fn malformed_replies_are_protocol_errors() {
        let decode = |structured, bytes: &[u8]| {
            let mut d = ReplyDecoder::new(structured, |h| (h == 1).then_some(4));
            d.decode(&mut BytesMut::from(bytes))
        };
        let protocol =
            |r: Result<Option<ReplyFrame>, CodecError>| matches!(r, Err(CodecError::Protocol(_)));
        // A structured chunk that was not negotiated, and one that is too long.
        let chunk = |length| ChunkHeader {
            flags: NBD_REPLY_FLAG_DONE,
            kind: NBD_REPLY_TYPE_OFFSET_DATA,
            handle: 1,
            length,
        };
        assert!(protocol(decode(false, &chunk(12).encode())));
        assert!(protocol(decode(true, &chunk(MAX_CHUNK_LEN + 1).encode())));
        assert!(matches!(
            decode(true, &chunk(MAX_CHUNK_LEN).encode()),
            Ok(None)
        ));
        // A successful reply for a handle not in flight.
        assert!(protocol(decode(false, &encode_simple_reply(0, 2))));
        assert!(matches!(
            decode(false, &encode_simple_reply(0, 1)),
            Ok(None)
        ));
        // A bad magic.
        assert!(protocol(decode(true, &[0x42; SIMPLE_REPLY_LEN])));
        // The stream ends inside a reply's data.
        let mut d = ReplyDecoder::new(false, |_| Some(4));
        let mut buf = BytesMut::from(&encode_simple_reply(0, 1)[..]);
        buf.put_slice(b"ab");
        assert!(matches!(d.decode_eof(&mut buf), Err(CodecError::Io(_))));
    }

    #[tokio::test]
    async fn sent_frames_are_the_encoded_frames() {
        let mut e = ReplyEncoder::new(true);
        let short = read_reply(1, 0, b"short");
        let long = read_reply(2, 0, &vec![9u8; IN_PLACE_MIN]);
        let mut expected = BytesMut::new();
        e.encode(short.clone(), &mut expected).unwrap();
        e.encode(long.clone(), &mut expected).unwrap();
        let (mut sent, mut buf) = (Vec::new(), BytesMut::new());
        for r in [&short, &long] {
            let data = e.encode_head(r, &mut buf);
            send_frame(&mut sent, &mut buf, data, 1 << 20)
                .await
                .unwrap();
        }
        // The long one went out in place, taking the short one gathered before it along.
        assert!(buf.is_empty());
        assert_eq!(sent, expected);
        let data = e.encode_head(&short, &mut buf);
        send_frame(&mut sent, &mut buf, data, 1 << 20)
            .await
            .unwrap();
        assert!(!buf.is_empty(), "short frames wait for the batch");
    }

    #[test]
    fn request_payload_must_match_the_header() {
        let mut buf = BytesMut::new();
        let bad = |r, p: &[u8]| {
            RequestEncoder
                .encode(
                    OutgoingRequest {
                        request: r,
                        payload: p,
                    },
                    &mut BytesMut::new(),
                )
                .is_err()
        };
        assert!(bad(request(NBD_CMD_WRITE, 1, 4), b"abc"));
        assert!(bad(request(NBD_CMD_READ, 1, 4), b"abcd"));
        encode_request(&mut buf, request(NBD_CMD_READ, 1, 4), b"");
        assert_eq!(buf.len(), REQUEST_LEN);
    }
}
