//! The migration stream in TLS with the hosts' certificates (`storaged pki`), between real VMMs
//! whose guest is a tiny halting kernel ([`e2e::tiny`]):
//! - the destination, told to expect host a (`--incoming-from a`), keeps listening through a
//!   raw TCP connection that closes at once, one that sends nothing, one that is not TLS, and a
//!   real VMM with host c's certificate of the same CA (a stray peer: its stream is refused,
//!   nothing runs), then takes the guest from host a's VMM and runs it;
//! - a source asked to reach host b refuses a destination whose certificate is host c's: the
//!   guest stays on the source, running;
//! - a destination nobody proves to be the source of fails at its deadline (status 5) and says
//!   how many connections it refused;
//! - identities need TLS: `--incoming-from` without a TLS directory is refused, as is a
//!   `destination_host` on a VMM without one.

use e2e::pki::Pki;
use e2e::tiny::{hlt_kernel, TinyVmm};
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A destination VMM of host `host` in `dir` expecting host `from` on a fresh port; returns it
/// and the port's address.
fn destination(
    dir: &Path,
    kernel: &Path,
    tls: &Path,
    from: &str,
    extra: &[&str],
) -> (TinyVmm, String) {
    let addr = format!("127.0.0.1:{}", e2e::free_port().unwrap());
    let mut args = vec![
        "--tls-dir",
        s(tls),
        "--incoming",
        &addr,
        "--incoming-from",
        from,
    ];
    args.extend_from_slice(extra);
    let vmm = TinyVmm::start(dir, "dst", kernel, &args).unwrap();
    (vmm, addr)
}

/// A VMM of host `host` (its certificate from `pki`) running the tiny kernel, named `name`.
fn tls_vmm(dir: &Path, name: &str, kernel: &Path, pki: &Pki, host: &str) -> TinyVmm {
    TinyVmm::start(
        dir,
        name,
        kernel,
        &["--tls-dir", s(&pki.host(host).unwrap())],
    )
    .unwrap()
}

/// Has `vmm` send its guest to `addr`, naming host b as the destination; the send is accepted.
fn send_to_b(vmm: &TinyVmm, addr: &str) {
    let (code, body) = vmm
        .send(&json!({"destination": addr, "destination_host": "b"}))
        .unwrap();
    assert_eq!(code, 202, "{body}");
}

#[test]
fn the_destination_admits_only_the_expected_source() {
    if !e2e::kvm_available("the_destination_admits_only_the_expected_source") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "cluster").unwrap();
    let kernel = hlt_kernel(dir.path()).unwrap();
    let (mut dst, addr) = destination(dir.path(), &kernel, &pki.host("b").unwrap(), "a", &[]);

    // A port scanner: connects and goes.
    drop(TcpStream::connect(&addr).unwrap());
    // A peer that connects and says nothing (it stays connected throughout).
    let _silent = TcpStream::connect(&addr).unwrap();
    // A plaintext migration stream: not TLS.
    let mut plain = TcpStream::connect(&addr).unwrap();
    plain.write_all(b"VMHOPMIG\x02\x00\x00\x00").unwrap();
    let mut rest = Vec::new();
    let _ = plain.read_to_end(&mut rest);
    // A real VMM of host c, a host of the same cluster: not the source b was told to expect.
    let mut stray = tls_vmm(dir.path(), "stray", &kernel, &pki, "c");
    send_to_b(&stray, &addr);
    let m = stray.wait_phase(&["failed"], WAIT).unwrap();
    assert_eq!(stray.info().unwrap()["state"], "running", "{m}");
    // The destination still waits, with nothing loaded.
    let d = dst.migration().unwrap();
    assert_eq!(d["phase"], "idle", "{d}");
    assert_eq!(dst.info().unwrap()["state"], "paused");

    // The source b expects.
    let mut src = tls_vmm(dir.path(), "src", &kernel, &pki, "a");
    send_to_b(&src, &addr);
    let done = dst.wait_phase(&["completed"], WAIT).unwrap();
    assert_eq!(dst.info().unwrap()["state"], "running", "{done}");
    src.wait_phase(&["completed"], WAIT).unwrap();
    let log = dst.stderr();
    assert!(log.contains("host=a"), "{log}");
    // The scanner, the plaintext stream and host c (and the silent peer once its handshake
    // timed out, if it did before a came).
    let refused: u32 = log
        .split("refused_before=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{log}"));
    assert!(refused >= 3, "{log}");
    assert!(
        log.contains("the peer is host \"c\", not the expected source \"a\""),
        "{log}"
    );
}

#[test]
fn the_source_refuses_a_destination_that_is_not_the_host_it_named() {
    if !e2e::kvm_available("the_source_refuses_a_destination_that_is_not_the_host_it_named") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "cluster").unwrap();
    let kernel = hlt_kernel(dir.path()).unwrap();
    // Host c listens where the source expects host b.
    let (mut dst, addr) = destination(dir.path(), &kernel, &pki.host("c").unwrap(), "a", &[]);
    let mut src = tls_vmm(dir.path(), "src", &kernel, &pki, "a");
    send_to_b(&src, &addr);
    let m = src.wait_phase(&["failed"], WAIT).unwrap();
    let err = m["error"].as_str().unwrap_or_default();
    assert!(err.contains("checking that it is \"b\""), "{m}");
    assert_eq!(src.info().unwrap()["state"], "running", "{m}");
    assert_eq!(dst.migration().unwrap()["phase"], "idle");
    assert!(dst.alive());
}

#[test]
fn a_destination_nobody_proves_to_be_the_source_of_gives_up_at_its_deadline() {
    if !e2e::kvm_available(
        "a_destination_nobody_proves_to_be_the_source_of_gives_up_at_its_deadline",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "cluster").unwrap();
    let kernel = hlt_kernel(dir.path()).unwrap();
    let tls = pki.host("b").unwrap();
    let (mut dst, addr) = destination(dir.path(), &kernel, &tls, "a", &["--accept-timeout", "3"]);
    drop(TcpStream::connect(&addr).unwrap());
    let status = dst.wait_exit(WAIT).unwrap();
    assert_eq!(status.code(), Some(5));
    let log = dst.stderr();
    assert!(
        log.contains("no source proving host \"a\" connected within"),
        "{log}"
    );
    assert!(log.contains("connections refused: 1"), "{log}");

    // Identities need TLS.
    let refused = TinyVmm::start(
        dir.path(),
        "plain",
        &kernel,
        &["--incoming", &addr, "--incoming-from", "a"],
    );
    let e = format!("{:#}", refused.err().unwrap());
    assert!(e.contains("--incoming-from needs tls_dir"), "{e}");
    let plain = TinyVmm::start(dir.path(), "plain2", &kernel, &[]).unwrap();
    let (code, body) = plain
        .send(&json!({"destination": addr, "destination_host": "b"}))
        .unwrap();
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("needs the VM's tls_dir"), "{body}");
}
