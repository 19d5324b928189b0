//! NBD spoken by hand over a blocking socket, for tests that must send what no real client
//! sends: malformed input, floods, connections abandoned at chosen points.

use anyhow::{ensure, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use storaged_client::protocol::*;

/// How long a test waits for the server to answer.
pub const ANSWER: Duration = Duration::from_secs(60);

/// Connects and does the fixed newstyle greeting (no zeroes).
pub fn greet(addr: SocketAddr) -> Result<TcpStream> {
    let mut t = TcpStream::connect(addr)?;
    t.set_read_timeout(Some(ANSWER))?;
    // Options go out in two writes (header, data): without this Nagle holds the second back
    // until the server's delayed ACK.
    t.set_nodelay(true)?;
    let mut hello = [0u8; 18];
    t.read_exact(&mut hello)?;
    ensure!(hello[..8] == NBDMAGIC.to_be_bytes() && hello[8..16] == IHAVEOPT.to_be_bytes());
    t.write_all(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes())?;
    Ok(t)
}

/// Sends one option.
pub fn option(t: &mut TcpStream, option: u32, data: &[u8]) -> Result<()> {
    let h = OptionHeader {
        option,
        length: data.len() as u32,
    };
    t.write_all(&h.encode())?;
    t.write_all(data)?;
    Ok(())
}

/// Reads one option reply.
pub fn option_reply(t: &mut TcpStream) -> Result<(OptionReplyHeader, Vec<u8>)> {
    let mut b = [0u8; OPTION_REPLY_LEN];
    t.read_exact(&mut b)?;
    let h = OptionReplyHeader::decode(&b)?;
    let mut d = vec![0u8; h.length as usize];
    t.read_exact(&mut d)?;
    Ok((h, d))
}

/// Sends `NBD_OPT_GO` for `export` without waiting for the answer.
pub fn send_go(t: &mut TcpStream, export: &str) -> Result<()> {
    let g = GoOption {
        name: export.into(),
        info: vec![],
    };
    option(t, NBD_OPT_GO, &g.encode())
}

/// `NBD_OPT_GO` on `export`, answered: the socket is in transmission.
pub fn go(t: &mut TcpStream, export: &str) -> Result<()> {
    send_go(t, export)?;
    loop {
        let (h, d) = option_reply(t)?;
        ensure!(!h.is_error(), "GO refused: {}", String::from_utf8_lossy(&d));
        if h.reply == NBD_REP_ACK {
            return Ok(());
        }
    }
}

/// Sends `NBD_OPT_LEASE` for `host` asking for `state`, and reads its ACK.
pub fn lease(t: &mut TcpStream, host: &str, state: RequestedState) -> Result<()> {
    let l = LeaseOption {
        host: host.into(),
        instance: format!("{host}-vm"),
        state,
        expected_epoch: 0,
    };
    option(t, NBD_OPT_LEASE, &l.encode())?;
    let (h, d) = option_reply(t)?;
    ensure!(
        h.reply == NBD_REP_ACK,
        "lease refused: {}",
        String::from_utf8_lossy(&d)
    );
    Ok(())
}

/// Sends a request header with the handle 0x1234_5678.
pub fn request(t: &mut TcpStream, kind: u16, flags: u16, offset: u64, length: u32) -> Result<()> {
    let r = Request {
        flags,
        kind,
        handle: 0x1234_5678,
        offset,
        length,
    };
    t.write_all(&r.encode())?;
    Ok(())
}

/// Reads a simple reply to a request of [`request`]; returns its error.
pub fn reply(t: &mut TcpStream) -> Result<u32> {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    t.read_exact(&mut b)?;
    let (err, handle) = decode_simple_reply(&b)?;
    ensure!(handle == 0x1234_5678);
    Ok(err)
}

/// Whether the server closed the connection within the socket's read timeout (a read ends,
/// or fails otherwise than by timing out).
pub fn closed(t: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    match t.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Closes the socket with a reset (SO_LINGER 0) instead of an orderly FIN.
pub fn reset(t: TcpStream) -> Result<()> {
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(&t, nix::sys::socket::sockopt::Linger, &linger)?;
    drop(t);
    Ok(())
}
