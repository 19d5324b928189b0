//! Bad migration streams are refused with a clear error and the guest stays where it was.
//!
//! Destination side (nothing boots, so these are quick): a stream of another version, a
//! corrupted frame, and a stream that ends before the hand-over each make the incoming VMM
//! exit with status 5 and say why; a connection that is not a migration stream at all (a port
//! scanner, an HTTP probe) is refused and the VMM keeps waiting for its source.
//! Source side (the suite's restored guest): a destination that answers garbage, one that dies
//! in the middle of the stream, a destination VMM killed in the middle of the stream, an
//! abort while the destination stalls, and a destination whose READY says it could not load
//! the state (after COMMIT went out) each leave the guest running on the source with its
//! memory workload intact, and a migration afterwards still succeeds.

use e2e::image::GuestImage;
use e2e::snapshot::vm_config;
use e2e::vmm::VmmGuest;
use e2e::workload::{mem_seq_after, MEM_START, REPLY};
use e2e::GuestTest;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

const EXIT: Duration = Duration::from_secs(60);

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind, 0, 0, 0];
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// The stream version the VMM speaks (vmm/src/migration/wire.rs).
const VERSION: u32 = 2;

fn preamble(version: u32) -> Vec<u8> {
    let mut p = b"VMHOPMIG".to_vec();
    p.extend_from_slice(&version.to_le_bytes());
    p
}

/// Starts an incoming VMM, feeds it `bytes`, and returns its exit status and stderr.
fn feed_incoming(image: &GuestImage, dir: &Path, bytes: &[u8]) -> (i32, String) {
    feed_incoming_after(image, dir, &[], bytes)
}

/// Like [`feed_incoming`], after connections that each send one of `probes` and close.
fn feed_incoming_after(
    image: &GuestImage,
    dir: &Path,
    probes: &[&[u8]],
    bytes: &[u8],
) -> (i32, String) {
    let addr = format!("127.0.0.1:{}", e2e::free_port().unwrap());
    let mut vmm = VmmGuest::start_incoming(&vm_config(image, dir), &addr).unwrap();
    for p in probes {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(p).unwrap();
        // The VMM may have refused and reset the probe already (it left bytes unread).
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
    }
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let status = vmm.wait_exit(EXIT).unwrap();
    (status.code().unwrap_or(-1), vmm.stderr())
}

#[test]
fn incoming_vmm_refuses_bad_streams_with_a_clear_error() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("incoming_vmm_refuses_bad_streams_with_a_clear_error")
    else {
        return;
    };

    let (code, err) = feed_incoming(&image, &dir.path().join("v"), &preamble(99));
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("migration stream version 99"), "{err}");

    // Probes are refused; the stream after them is the one that counts.
    let probes: [&[u8]; 2] = [b"", b"GET / HTTP/1.1\r\n\r\n"];
    let (code, err) = feed_incoming_after(&image, &dir.path().join("m"), &probes, &preamble(99));
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("not a vmhop migration stream"), "{err}");
    assert!(err.contains("refused_before=2"), "{err}");
    assert!(err.contains("migration stream version 99"), "{err}");

    let hello = br#"{"name":"vm","shape":{"memory_mib":128,"vcpus":1,"disks":2},"resume":"auto"}"#;
    let mut corrupt = preamble(VERSION);
    corrupt.extend(frame(1, hello));
    let mut pages = frame(3, &[0u8; 8 + 4096]);
    let last = pages.len() - 1;
    pages[last] ^= 0xff;
    corrupt.extend(pages);
    let (code, err) = feed_incoming(&image, &dir.path().join("c"), &corrupt);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("checksum"), "{err}");

    let mut short = preamble(VERSION);
    short.extend(frame(1, hello));
    short.extend(frame(3, &[0u8; 8 + 4096]));
    let (code, err) = feed_incoming(&image, &dir.path().join("s"), &short);
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("closed the stream before the hand-over"),
        "{err}"
    );

    let other = br#"{"name":"vm","shape":{"memory_mib":256,"vcpus":1,"disks":2},"resume":"auto"}"#;
    let mut wrong = preamble(VERSION);
    wrong.extend(frame(1, other));
    let (code, err) = feed_incoming(&image, &dir.path().join("w"), &wrong);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("memory_mib: 256"), "{err}");
}

/// The source still runs its guest, whose memory workload goes on with no error.
fn still_running(guest: &mut VmmGuest, after_seq: &mut u64) {
    let (code, body) = guest.api("GET", "/v1/vm").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains(r#""state":"running""#), "{body}");
    let s = mem_seq_after(&mut guest.agent, *after_seq + 1);
    *after_seq = s.num("seq").unwrap();
}

fn send(guest: &VmmGuest, addr: &str) {
    let params = format!(r#"{{"destination":"{addr}","resume":"auto"}}"#);
    guest.send_migration(&params).unwrap();
}

/// A fake destination: accepts one connection and runs `f` on it in a thread.
fn fake_destination(f: impl FnOnce(TcpStream) + Send + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        if let Ok((s, _)) = l.accept() {
            f(s)
        }
    });
    addr
}

fn read_exactly(s: &mut TcpStream, n: usize) {
    let mut buf = vec![0u8; n];
    let _ = s.read_exact(&mut buf);
}

/// Reads the preamble and HELLO like a destination, and accepts.
fn accept_hello(s: &mut TcpStream) {
    read_exactly(s, 12);
    let mut header = [0u8; 12];
    let _ = s.read_exact(&mut header);
    let n = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
    read_exactly(s, n);
    let _ = s.write_all(&frame(2, br#"{"ok":true,"error":null}"#));
}

#[test]
fn source_keeps_the_guest_when_the_destination_fails() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("source_keeps_the_guest_when_the_destination_fails")
    else {
        return;
    };
    let booted = e2e::snapshot::booted(&image).unwrap();
    let mut guest =
        VmmGuest::restore(&vm_config(&image, &dir.path().join("src")), &booted).unwrap();
    let r = guest.agent.command("mem start 4", MEM_START);
    guest.ok(r);
    let mut seq = 0;
    still_running(&mut guest, &mut seq);

    // A destination that answers HELLO with a corrupt frame.
    let addr = fake_destination(|mut s| {
        read_exactly(&mut s, 12);
        let mut reply = frame(2, br#"{"ok":true,"error":null}"#);
        reply[12] ^= 0x20;
        let _ = s.write_all(&reply);
        read_exactly(&mut s, 1 << 20);
    });
    send(&guest, &addr);
    let m = guest.wait_migration(&["failed"], EXIT).unwrap();
    assert!(m["error"].as_str().unwrap().contains("checksum"), "{m}");
    still_running(&mut guest, &mut seq);

    // A destination that dies after 1 MiB of the stream.
    let addr = fake_destination(|mut s| {
        accept_hello(&mut s);
        read_exactly(&mut s, 1 << 20);
    });
    send(&guest, &addr);
    let m = guest.wait_migration(&["failed"], EXIT).unwrap();
    eprintln!("destination died mid-stream: {m}");
    still_running(&mut guest, &mut seq);

    // A real destination VMM killed (SIGKILL) in the middle of the stream: frozen once the
    // first pages went out, so that it cannot reach the hand-over, then killed.
    let addr = format!("127.0.0.1:{}", e2e::free_port().unwrap());
    let mut victim =
        VmmGuest::start_incoming(&vm_config(&image, &dir.path().join("victim")), &addr).unwrap();
    send(&guest, &addr);
    let deadline = std::time::Instant::now() + EXIT;
    loop {
        let m = guest.migration().unwrap();
        if m["bytes_sent"].as_u64().unwrap() > 0 {
            break;
        }
        assert_eq!(m["phase"], "precopy", "{m}");
        assert!(std::time::Instant::now() < deadline, "no pages sent: {m}");
    }
    let pid = victim.pid() as libc::pid_t;
    // SAFETY: signals to the destination VMM this test started and still owns.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    assert_eq!(guest.migration().unwrap()["phase"], "precopy");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let m = guest.wait_migration(&["failed"], EXIT).unwrap();
    eprintln!("destination VMM killed mid-stream: {m}");
    assert!(!victim.wait_exit(EXIT).unwrap().success());
    still_running(&mut guest, &mut seq);

    // A destination that stops reading; the operator aborts.
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
    let addr = fake_destination(move |mut s| {
        accept_hello(&mut s);
        let _ = hold_rx.recv();
    });
    send(&guest, &addr);
    let m = guest.wait_migration(&["precopy"], EXIT).unwrap();
    assert_eq!(m["phase"], "precopy");
    let (code, body) = guest.api("POST", "/v1/migration/abort").unwrap();
    assert_eq!(code, 200, "{body}");
    let m = guest.wait_migration(&["aborted"], EXIT).unwrap();
    eprintln!("aborted: {m}");
    drop(hold_tx);
    still_running(&mut guest, &mut seq);

    // A destination that cannot load the state: its READY says why. COMMIT follows STATE
    // without waiting for READY, so it is already on its way; such a destination exits
    // without reading it, and the guest stays here.
    let (commit_tx, commit_rx) = std::sync::mpsc::channel::<bool>();
    let addr = fake_destination(move |mut s| {
        accept_hello(&mut s);
        let mut commit_seen = false;
        loop {
            let mut header = [0u8; 12];
            if s.read_exact(&mut header).is_err() {
                break;
            }
            read_exactly(
                &mut s,
                u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize,
            );
            match header[0] {
                10 => {
                    let _ = s.write_all(&frame(11, &[]));
                }
                5 => {
                    let refusal = br#"{"ok":false,"error":"state refused by the test"}"#;
                    let _ = s.write_all(&frame(6, refusal));
                }
                7 => commit_seen = true,
                _ => {}
            }
        }
        let _ = commit_tx.send(commit_seen);
    });
    send(&guest, &addr);
    let m = guest.wait_migration(&["failed"], EXIT).unwrap();
    assert!(
        m["error"]
            .as_str()
            .unwrap()
            .contains("state refused by the test"),
        "{m}"
    );
    still_running(&mut guest, &mut seq);
    // The source ends the stream once it resumed the guest; COMMIT had gone out before READY.
    assert!(commit_rx.recv_timeout(EXIT).unwrap(), "COMMIT before READY");

    // And a real destination still takes it.
    let addr = format!("127.0.0.1:{}", e2e::free_port().unwrap());
    let mut dst =
        VmmGuest::start_incoming(&vm_config(&image, &dir.path().join("dst")), &addr).unwrap();
    send(&guest, &addr);
    let m = guest.wait_migration(&["completed"], EXIT).unwrap();
    eprintln!("migrated after the failures: {m}");
    dst.wait_migration(&["completed"], EXIT).unwrap();
    let (code, body) = guest.api("GET", "/v1/vm").unwrap();
    assert!(
        code == 200 && body.contains(r#""state":"paused""#),
        "{body}"
    );
    let mut seq_dst = seq;
    still_running(&mut dst, &mut seq_dst);
    let m = dst.agent.command("mem stop", REPLY);
    assert_eq!(dst.ok(m).num("errors"), Some(0));
}
