//! No client can make storaged hold without limit: a client that never reads its replies, a
//! flood of bad commands, ten thousand standby connects under new host ids, connections
//! abandoned right after NBD_OPT_GO, too many connections, clients that idle in the handshake
//! or in transmission. Each test watches the daemon's peak memory (VmHWM) and the service
//! another client gets meanwhile.

use anyhow::{ensure, Context, Result};
use e2e::nbd_socket::{closed, go, greet, lease, option_reply, request, reset, send_go};
use e2e::process::wait_for;
use e2e::storaged::{client_config, Storaged, DEADLINE};
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};
use storaged_client::nbd::{Client, ClientConfig};
use storaged_client::protocol::*;

/// Most the daemon's peak resident memory may grow during an abuse.
const MEMORY_BOUND_KIB: u64 = 96 << 10;

/// A storaged with the serve flags `extra` and a 64 MiB volume "v" that anonymous clients may
/// write.
fn start(extra: &[&str]) -> Result<(tempfile::TempDir, Storaged)> {
    let dir = tempfile::tempdir()?;
    let s = Storaged::start_with(dir.path(), extra)?;
    s.create_volume("v", "64M", &["--anonymous", "read-write-without-primary"])?;
    Ok((dir, s))
}

/// Another client connects, writes 1 MiB and reads it back (anonymously) while the abuse
/// goes on; returns how long that took (printed, not judged: the machine may be loaded).
fn service_time(s: &Storaged) -> Result<Duration> {
    let t = Instant::now();
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    e2e::block_on(async {
        let cfg = ClientConfig::new(vec![s.nbd.to_string()], "v");
        let c = Client::connect(&cfg).await?;
        c.write_slice(32 << 20, &data, false).await?;
        let back = c.read(32 << 20, 1 << 20).await?;
        ensure!(back[..] == data[..], "another client read other data back");
        c.disconnect().await?;
        anyhow::Ok(())
    })
    .context("another client's service")?;
    Ok(t.elapsed())
}

/// Checks that the daemon's peak memory grew by less than [`MEMORY_BOUND_KIB`] since `base`
/// and that another client is served meanwhile.
fn bounded_and_serving(s: &Storaged, base: u64, what: &str) -> Result<()> {
    let grown = s.status_kib("VmHWM")?.saturating_sub(base);
    ensure!(
        grown < MEMORY_BOUND_KIB,
        "{what}: peak memory grew by {grown} KiB"
    );
    let took = service_time(s)?;
    eprintln!("{what}: peak memory +{grown} KiB, another client served in {took:?}");
    Ok(())
}

/// Writes `bytes` until the server stops reading for a while (its budget is spent) or all is
/// sent; returns how much went out.
fn write_until_blocked(t: &mut TcpStream, bytes: &[u8]) -> Result<usize> {
    t.set_write_timeout(Some(Duration::from_secs(3)))?;
    let mut sent = 0;
    for piece in bytes.chunks(64 << 10) {
        // Blocked (WouldBlock, TimedOut), or already disconnected by the server.
        if t.write_all(piece).is_err() {
            break;
        }
        sent += piece.len();
    }
    Ok(sent)
}

/// The requests `(kind, offset, length)` without data, encoded one after the other (the
/// handle is the index).
fn encoded(requests: impl Iterator<Item = (u16, u64, u32)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (handle, (kind, offset, length)) in requests.enumerate() {
        let r = Request {
            flags: 0,
            kind,
            handle: handle as u64,
            offset,
            length,
        };
        out.extend_from_slice(&r.encode());
    }
    out
}

#[test]
fn a_client_that_never_reads_its_replies_is_bounded_then_dropped() -> Result<()> {
    let (_d, s) = start(&["--reply-timeout-secs", "3"])?;
    let base = s.status_kib("VmHWM")?;
    let mut t = greet(s.nbd)?;
    go(&mut t, "v")?;
    // 4096 reads of 1 MiB (4 GiB of replies), none of them read.
    let reqs = encoded((0..4096).map(|i| (NBD_CMD_READ, (i % 64) << 20, 1 << 20)));
    let sent = write_until_blocked(&mut t, &reqs)?;
    eprintln!("sent {} of 4096 reads", sent / REQUEST_LEN);
    bounded_and_serving(&s, base, "slow reader")?;
    wait_for("the unread connection to be dropped", DEADLINE, || {
        s.log().contains("replies could not be sent").then_some(())
    })?;
    ensure!(s.log().contains("read no reply for 3s"), "{}", s.log());
    Ok(())
}

#[test]
fn a_flood_of_bad_commands_is_bounded() -> Result<()> {
    let (_d, s) = start(&["--reply-timeout-secs", "3"])?;
    let base = s.status_kib("VmHWM")?;
    let mut t = greet(s.nbd)?;
    go(&mut t, "v")?;
    // Two million unknown commands (56 MB), replies unread: each reply used to wait in an
    // unbounded queue.
    let bad = Request {
        flags: 0,
        kind: 99,
        handle: 7,
        offset: 0,
        length: 0,
    }
    .encode();
    let flood: Vec<u8> = bad
        .iter()
        .copied()
        .cycle()
        .take(REQUEST_LEN * 2_000_000)
        .collect();
    let sent = write_until_blocked(&mut t, &flood)?;
    eprintln!("sent {} bad commands", sent / REQUEST_LEN);
    bounded_and_serving(&s, base, "bad-command flood")?;
    // Bad commands with read-like replies (reads past the end) are held alike.
    let mut t = greet(s.nbd)?;
    go(&mut t, "v")?;
    let past_end = Request {
        flags: 0,
        kind: NBD_CMD_READ,
        handle: 8,
        offset: 1 << 40,
        length: 4096,
    }
    .encode();
    let flood: Vec<u8> = past_end
        .iter()
        .copied()
        .cycle()
        .take(REQUEST_LEN * 1_000_000)
        .collect();
    write_until_blocked(&mut t, &flood)?;
    bounded_and_serving(&s, base, "reads past the end")?;
    // Commands without data (each once queued a blocking task without limit) are held alike.
    let mut t = greet(s.nbd)?;
    go(&mut t, "v")?;
    let kinds = [NBD_CMD_FLUSH, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES];
    let flood = encoded((0..1_000_000).map(|i| (kinds[i % 3], (i as u64 % 64) << 20, 4096)));
    let sent = write_until_blocked(&mut t, &flood)?;
    eprintln!("sent {} flushes, trims and zeroes", sent / REQUEST_LEN);
    bounded_and_serving(&s, base, "flushes, trims and zeroes")?;
    Ok(())
}

#[test]
fn ten_thousand_standby_connects_keep_the_lease_table_small() -> Result<()> {
    let (_d, s) = start(&["--max-standby", "16"])?;
    s.create_volume("s", "1M", &["--flip-over-nbd"])?;
    let base = s.status_kib("VmHWM")?;
    // Clients that outlive one call need a runtime that outlives it too.
    let rt = tokio::runtime::Runtime::new()?;
    let primary = rt.block_on(Client::connect(&client_config(
        &s,
        "s",
        "host-a",
        RequestedState::Primary,
    )))?;
    let start = Instant::now();
    for i in 0..10_000 {
        let mut t = greet(s.nbd)?;
        lease(&mut t, &format!("standby-{i}"), RequestedState::Standby)?;
        go(&mut t, "s")?;
        drop(t);
    }
    eprintln!("10000 standby connects in {:?}", start.elapsed());
    let leases = s.cli(&["lease", "list", "s"])?;
    let standbys = leases.lines().filter(|l| l.contains("standby")).count();
    ensure!(standbys <= 16, "{standbys} standby leases kept:\n{leases}");
    bounded_and_serving(&s, base, "10000 standby connects")?;
    // A flip still works and is quick (the lease table it writes is small).
    let standby = rt.block_on(Client::connect(&client_config(
        &s,
        "s",
        "host-b",
        RequestedState::Standby,
    )))?;
    let rep = rt.block_on(standby.flip())?;
    eprintln!("flip after 10000 standby connects: {} us", rep.total_us);
    drop(primary);
    Ok(())
}

#[test]
fn connections_abandoned_right_after_go_leave_nothing_behind() -> Result<()> {
    let (_d, s) = start(&[])?;
    let base = s.status_kib("VmHWM")?;
    for _ in 0..300 {
        let mut t = greet(s.nbd)?;
        send_go(&mut t, "v")?;
        reset(t)?;
    }
    wait_for("every connection to be gone", DEADLINE, || {
        let show = s.cli(&["volume", "show", "v"]).ok()?;
        show.contains("\"connections\": 0").then_some(())
    })?;
    bounded_and_serving(&s, base, "300 aborts after GO")?;
    s.cli(&["volume", "delete", "v"])?;
    Ok(())
}

#[test]
fn connection_caps_and_timeouts_close_what_is_too_much_or_idle() -> Result<()> {
    let (_d, s) = start(&[
        "--max-connections",
        "8",
        "--max-connections-per-volume",
        "4",
        "--handshake-timeout-secs",
        "2",
        "--idle-timeout-secs",
        "2",
    ])?;
    // Eight clients idle in the handshake fill the server: a ninth is closed at once...
    let mut idle: Vec<TcpStream> = (0..8).map(|_| greet(s.nbd)).collect::<Result<_>>()?;
    let mut ninth = TcpStream::connect(s.nbd)?;
    ninth.set_read_timeout(Some(e2e::nbd_socket::ANSWER))?;
    ensure!(closed(&mut ninth), "a ninth connection was served");
    // ...and the eight are closed by the handshake timeout.
    for c in &mut idle {
        ensure!(closed(c), "an idle handshake stayed open");
    }
    // Four connections per volume: a fifth GO is refused with a policy error.
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut c = greet(s.nbd)?;
        go(&mut c, "v")?;
        open.push(c);
    }
    let mut fifth = greet(s.nbd)?;
    send_go(&mut fifth, "v")?;
    let (h, why) = option_reply(&mut fifth)?;
    ensure!(
        h.reply == NBD_REP_ERR_POLICY,
        "{h:?} {}",
        String::from_utf8_lossy(&why)
    );
    // Connections without a lease that send nothing are closed after the idle timeout.
    for c in &mut open {
        ensure!(closed(c), "an idle anonymous connection stayed open");
    }
    drop(fifth);
    // A client that keeps sending is never idle.
    let mut busy = greet(s.nbd)?;
    go(&mut busy, "v")?;
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(500));
        request(&mut busy, NBD_CMD_FLUSH, 0, 0, 0)?;
        busy.flush()?;
        ensure!(e2e::nbd_socket::reply(&mut busy)? == 0);
    }
    drop(busy);
    // A client slow to send a write's data is in the middle of a request, not idle: the
    // request is answered (the wait for the data was once cut short, and the header lost).
    let mut slow = greet(s.nbd)?;
    go(&mut slow, "v")?;
    request(&mut slow, NBD_CMD_WRITE, 0, 0, 4096)?;
    slow.flush()?;
    std::thread::sleep(Duration::from_secs(3));
    slow.write_all(&[5u8; 4096])?;
    ensure!(
        e2e::nbd_socket::reply(&mut slow)? == 0,
        "the slow write failed"
    );
    drop(slow);
    // A lease holder may idle (a standby waits for its flip): still served after the timeout.
    let rt = tokio::runtime::Runtime::new()?;
    let c = rt.block_on(Client::connect(&client_config(
        &s,
        "v",
        "host-a",
        RequestedState::Primary,
    )))?;
    std::thread::sleep(Duration::from_secs(3));
    rt.block_on(c.read(0, 4096))
        .context("the idle lease holder's read")?;
    Ok(())
}
