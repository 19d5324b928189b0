//! Malformed and hostile input over raw sockets: the server answers with the protocol's error
//! or disconnects cleanly, logs it, never half-writes, and keeps serving everyone else; writes
//! of every size sent back to back keep their framing and their data.

use anyhow::{ensure, Result};
use e2e::nbd_socket::{closed, go, greet, option, option_reply, reply, request};
use e2e::process::{run_ok, wait_for};
use e2e::storaged::{Storaged, DEADLINE};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;
use storaged_client::protocol::*;

fn start() -> Result<(tempfile::TempDir, Storaged)> {
    Storaged::start_with_volume("v", "1M", &["--anonymous", "read-write-without-primary"])
}

/// A storaged with volume "v" and a raw connection past the handshake.
fn in_transmission() -> Result<(tempfile::TempDir, Storaged, TcpStream)> {
    let (d, s) = start()?;
    let mut t = greet(s.nbd)?;
    go(&mut t, "v")?;
    Ok((d, s, t))
}

#[test]
fn bad_handshake_input_disconnects_and_the_server_keeps_serving() -> Result<()> {
    let (_d, s) = start()?;
    // Wrong option magic.
    let mut t = greet(s.nbd)?;
    t.write_all(&[0x42; 16])?;
    ensure!(closed(&mut t));
    // Unknown client flags.
    let mut t = TcpStream::connect(s.nbd)?;
    t.read_exact(&mut [0u8; 18])?;
    t.write_all(&0x8000_0000u32.to_be_bytes())?;
    ensure!(closed(&mut t));
    // Oversized option data.
    let mut t = greet(s.nbd)?;
    t.write_all(
        &OptionHeader {
            option: NBD_OPT_GO,
            length: 1 << 30,
        }
        .encode(),
    )?;
    ensure!(closed(&mut t));
    // Unknown option, malformed GO and malformed lease: error replies, then GO still works.
    let mut t = greet(s.nbd)?;
    option(&mut t, 0x77, b"abc")?;
    ensure!(option_reply(&mut t)?.0.reply == NBD_REP_ERR_UNSUP);
    option(&mut t, NBD_OPT_GO, &[0, 0, 0, 9, b'v'])?;
    ensure!(option_reply(&mut t)?.0.reply == NBD_REP_ERR_INVALID);
    option(&mut t, NBD_OPT_LEASE, &[0, 1, 1])?;
    ensure!(option_reply(&mut t)?.0.reply == NBD_REP_ERR_INVALID);
    option(&mut t, NBD_OPT_STRUCTURED_REPLY, b"x")?;
    ensure!(option_reply(&mut t)?.0.reply == NBD_REP_ERR_INVALID);
    let g = GoOption {
        name: "nope".into(),
        info: vec![],
    };
    option(&mut t, NBD_OPT_GO, &g.encode())?;
    let (h, msg) = option_reply(&mut t)?;
    ensure!(h.reply == NBD_REP_ERR_UNKNOWN && String::from_utf8_lossy(&msg).contains("nope"));
    go(&mut t, "v")?;
    // EXPORT_NAME of an unknown export: the protocol allows only a disconnect.
    let mut t = greet(s.nbd)?;
    option(&mut t, NBD_OPT_EXPORT_NAME, b"nope")?;
    ensure!(closed(&mut t));
    // EXPORT_NAME of a real one: size and flags, no zeroes (negotiated away).
    let mut t = greet(s.nbd)?;
    option(&mut t, NBD_OPT_EXPORT_NAME, b"v")?;
    let mut b = [0u8; 10];
    t.read_exact(&mut b)?;
    ensure!(u64::from_be_bytes(b[..8].try_into()?) == 1 << 20);
    run_ok(Command::new("nbdinfo").arg(s.uri("v")))?;
    ensure!(s.log().contains("handshake failed"));
    ensure!(s.log().contains("bad magic"), "{}", s.log());
    Ok(())
}

#[test]
fn bad_requests_get_nbd_errors_and_the_stream_stays_in_sync() -> Result<()> {
    let (_d, s, mut t) = in_transmission()?;
    let end = 1u64 << 20;
    request(&mut t, 99, 0, 0, 0)?;
    ensure!(reply(&mut t)? == NBD_EINVAL, "unknown command");
    request(&mut t, NBD_CMD_READ, 0, end - 100, 512)?;
    ensure!(reply(&mut t)? == NBD_EINVAL, "read past the end");
    request(&mut t, NBD_CMD_READ, 0, u64::MAX - 10, 512)?;
    ensure!(reply(&mut t)? == NBD_EINVAL, "offset overflow");
    request(&mut t, NBD_CMD_READ, 0x4000, 0, 512)?;
    ensure!(reply(&mut t)? == NBD_EINVAL, "unknown flag");
    request(&mut t, NBD_CMD_READ, 0, 0, MAX_REQUEST_LEN + 1)?;
    ensure!(reply(&mut t)? == NBD_EOVERFLOW, "oversize read");
    request(&mut t, NBD_CMD_WRITE, 0, end - 256, 512)?;
    t.write_all(&[0xab; 512])?;
    ensure!(reply(&mut t)? == NBD_ENOSPC, "write past the end");
    request(&mut t, NBD_CMD_TRIM, 0, end, 1)?;
    ensure!(reply(&mut t)? == NBD_EINVAL, "trim past the end");
    // An oversize write: the payload is read and dropped, the stream stays usable.
    let big = MAX_REQUEST_LEN as usize + 4096;
    request(&mut t, NBD_CMD_WRITE, 0, 0, big as u32)?;
    t.write_all(&vec![0xcd; big])?;
    ensure!(reply(&mut t)? == NBD_EOVERFLOW, "oversize write");
    // Nothing of the refused writes reached the disk; a normal read still works.
    request(&mut t, NBD_CMD_READ, 0, end - 512, 512)?;
    ensure!(reply(&mut t)? == 0);
    let mut data = vec![0u8; 512];
    t.read_exact(&mut data)?;
    ensure!(data.iter().all(|&b| b == 0));
    let file = std::fs::read(s.volume_file("v"))?;
    ensure!(
        file.iter().all(|&b| b == 0),
        "a refused write reached the disk"
    );
    // The flip command on an anonymous connection is refused.
    request(&mut t, NBD_CMD_LEASE_FLIP, 0, 0, FLIP_REPORT_LEN)?;
    ensure!(reply(&mut t)? == NBD_EINVAL);
    // Wrong request magic: disconnect.
    t.write_all(&[0u8; REQUEST_LEN])?;
    ensure!(closed(&mut t));
    ensure!(s.log().contains("oversize write"));
    Ok(())
}

#[test]
fn client_vanishing_mid_write_leaves_no_partial_data() -> Result<()> {
    let (_d, s, mut t) = in_transmission()?;
    request(&mut t, NBD_CMD_WRITE, 0, 4096, 65536)?;
    t.write_all(&[0xee; 30000])?;
    t.flush()?;
    drop(t);
    wait_for("the server to log the vanished client", DEADLINE, || {
        s.log().contains("connection dropped").then_some(())
    })?;
    let file = std::fs::read(s.volume_file("v"))?;
    ensure!(
        file.iter().all(|&b| b == 0),
        "a partial write reached the disk"
    );
    // Also a client that vanishes in the handshake, mid-option.
    let mut t = greet(s.nbd)?;
    t.write_all(
        &OptionHeader {
            option: NBD_OPT_GO,
            length: 100,
        }
        .encode()[..10],
    )?;
    drop(t);
    let out =
        run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0 0 1M", &s.uri("v")]))?;
    ensure!(!String::from_utf8_lossy(&out.stdout).contains("failed"));
    Ok(())
}

#[test]
fn many_pipelined_requests_are_each_answered_once() -> Result<()> {
    let (_d, _s, mut t) = in_transmission()?;
    t.set_read_timeout(Some(Duration::from_secs(60)))?;
    // 64 pipelined writes without waiting, then 64 reads; every handle is answered once.
    let mut sent = std::collections::BTreeSet::new();
    let mut wbuf = Vec::new();
    for i in 0..64u64 {
        let r = Request {
            flags: 0,
            kind: NBD_CMD_WRITE,
            handle: i,
            offset: i * 4096,
            length: 4096,
        };
        wbuf.extend_from_slice(&r.encode());
        wbuf.extend(std::iter::repeat_n(i as u8, 4096));
        sent.insert(i);
    }
    t.write_all(&wbuf)?;
    for _ in 0..64 {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        t.read_exact(&mut b)?;
        let (err, h) = decode_simple_reply(&b)?;
        ensure!(err == 0 && sent.remove(&h), "handle {h} err {err}");
    }
    let mut rbuf = Vec::new();
    for i in 0..64u64 {
        let r = Request {
            flags: 0,
            kind: NBD_CMD_READ,
            handle: 100 + i,
            offset: i * 4096,
            length: 4096,
        };
        rbuf.extend_from_slice(&r.encode());
    }
    t.write_all(&rbuf)?;
    for _ in 0..64 {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        t.read_exact(&mut b)?;
        let (err, h) = decode_simple_reply(&b)?;
        ensure!(err == 0 && (100..164).contains(&h));
        let mut d = vec![0u8; 4096];
        t.read_exact(&mut d)?;
        ensure!(
            d.iter().all(|&x| x == (h - 100) as u8),
            "handle {h} got wrong data"
        );
    }
    request(&mut t, NBD_CMD_DISC, 0, 0, 0)?;
    ensure!(closed(&mut t));
    Ok(())
}

#[test]
fn back_to_back_writes_of_every_size_keep_their_data_and_framing() -> Result<()> {
    // The server receives long write data straight into the write's buffer and reads only a
    // little ahead after one: writes of every size, FUA or not, sent in one go without waiting,
    // must each land whole where they were sent, and the stream stay in sync.
    let (_d, s) =
        Storaged::start_with_volume("v", "64M", &["--anonymous", "read-write-without-primary"])?;
    let mut t = greet(s.nbd)?;
    go(&mut t, "v")?;
    t.set_read_timeout(Some(Duration::from_secs(60)))?;
    let sizes = [
        1 << 20,
        4096,
        300 << 10,
        128 << 10,
        29,
        (1 << 20) + 7,
        64 << 10,
        4 << 20,
    ];
    let (mut wbuf, mut ranges, mut offset) = (Vec::new(), Vec::new(), 0u64);
    for (i, &len) in sizes.iter().cycle().take(40).enumerate() {
        let r = Request {
            flags: if i % 3 == 0 { NBD_CMD_FLAG_FUA } else { 0 },
            kind: NBD_CMD_WRITE,
            handle: i as u64,
            offset,
            length: len,
        };
        wbuf.extend_from_slice(&r.encode());
        wbuf.extend((0..len).map(|j| (j as u64 * 7 + i as u64) as u8));
        ranges.push((offset, len));
        offset += u64::from(len) + 512;
    }
    ensure!(offset <= 64 << 20);
    let mut reader = t.try_clone()?;
    let n = ranges.len();
    let replies = std::thread::spawn(move || -> Result<()> {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..n {
            let mut b = [0u8; SIMPLE_REPLY_LEN];
            reader.read_exact(&mut b)?;
            let (err, h) = decode_simple_reply(&b)?;
            ensure!(err == 0 && seen.insert(h), "handle {h} err {err}");
        }
        Ok(())
    });
    t.write_all(&wbuf)?;
    replies.join().expect("reply reader")?;
    request(&mut t, NBD_CMD_FLUSH, 0, 0, 0)?;
    ensure!(reply(&mut t)? == 0);
    for (i, &(offset, len)) in ranges.iter().enumerate() {
        request(&mut t, NBD_CMD_READ, 0, offset, len)?;
        ensure!(reply(&mut t)? == 0);
        let mut d = vec![0u8; len as usize];
        t.read_exact(&mut d)?;
        let want = (0..len).map(|j| (j as u64 * 7 + i as u64) as u8);
        ensure!(
            d.iter().copied().eq(want),
            "write {i} ({len} bytes) read back wrong"
        );
    }
    request(&mut t, NBD_CMD_DISC, 0, 0, 0)?;
    ensure!(closed(&mut t));
    Ok(())
}
