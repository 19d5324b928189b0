//! The vhost-user-blk backend reaches a storaged that requires TLS (loopback too) with the
//! host's certificate (`--tls-dir`): its lease is the certificate's host, named or not on the
//! command line; a host id other than the certificate's is refused before any connection, and
//! without a certificate storaged refuses the backend.

use anyhow::Result;
use e2e::pki::Pki;
use e2e::storaged::Storaged;
use e2e::vhost::Backend;
use std::process::{Command, Stdio};

/// Runs the backend on `vol` with `args` until it exits (it cannot open the disk); returns its
/// status and stderr.
fn refused(dir: &std::path::Path, s: &Storaged, args: &[&str]) -> Result<(i32, String)> {
    let nbd = s.nbd.to_string();
    let out = Command::new(e2e::binary("vhost-user-blk"))
        .arg("--socket")
        .arg(dir.join("refused.sock"))
        .args(["--storaged", &nbd, "--volume", "vol", "--instance-id", "vm"])
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn the_backend_proves_its_host_with_the_certificate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path(), "cluster")?;
    let storage = pki.host("storage")?;
    let s = Storaged::start_tls_only(dir.path(), &storage)?;
    s.create_volume("vol", "16M", &["--host", "a"])?;
    let a = pki.host("a")?;
    let a = a.to_str().unwrap_or_default();
    let nbd = s.nbd.to_string();

    // No --host-id: the certificate's host holds the lease.
    let backend = Backend::start(
        dir.path(),
        "a",
        &[
            "--storaged",
            &nbd,
            "--volume",
            "vol",
            "--instance-id",
            "vm",
            "--tls-dir",
            a,
            "--server-name",
            "storage",
        ],
    )?;
    let leases = s.cli(&["lease", "list", "vol"])?;
    assert!(
        leases
            .lines()
            .any(|l| l.starts_with("a ") && l.contains("primary")),
        "{leases}"
    );
    drop(backend);

    // Another host id than the certificate's: refused before connecting.
    let (code, err) = refused(dir.path(), &s, &["--tls-dir", a, "--host-id", "b"])?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("proves host \"a\""), "{err}");
    // Without TLS: storaged refuses it.
    let (code, err) = refused(dir.path(), &s, &["--host-id", "a"])?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("requires TLS"), "{err}");
    Ok(())
}
