//! Authenticated identities at storaged: NBD over TLS with client certificates of the
//! cluster's CA. A host is whoever its certificate says, whatever its lease option claims; a
//! volume's host list decides who may hold leases on it; unmodified clients (qemu-img,
//! qemu-io, nbdinfo) reach it over TLS with x509 certificates and are refused without one.

use anyhow::{bail, ensure, Result};
use e2e::pki::Pki;
use e2e::process::run_ok;
use e2e::storaged::Storaged;
use std::path::Path;
use std::process::Command;
use storaged_client::nbd::{Client, ClientConfig, ClientError, LeaseSpec};
use storaged_client::protocol::{RequestedState, NBD_REP_ERR_POLICY, NBD_REP_ERR_TLS_REQD};

/// storaged with the `storage` host's certificate, TLS required even on loopback, and a volume
/// `vol` that hosts a and b may hold leases on.
fn storage(dir: &Path, pki: &Pki) -> Result<Storaged> {
    let tls_dir = pki.host("storage")?;
    let s = Storaged::start_tls_only(dir, &tls_dir)?;
    s.create_volume("vol", "16M", &["--host", "a", "--host", "b"])?;
    Ok(s)
}

/// A lease-aware client configuration for `claimed` on `vol`.
fn lease(s: &Storaged, claimed: &str, state: RequestedState) -> ClientConfig {
    let mut cfg = ClientConfig::new(vec![s.nbd.to_string()], "vol").with_lease(LeaseSpec {
        host: claimed.into(),
        instance: format!("{claimed}-vm"),
        state,
        expected_epoch: 0,
    });
    cfg.rounds = 1;
    cfg
}

fn refused_with(r: Result<Client, ClientError>, code: u32) -> Result<String> {
    match r {
        Err(ClientError::Refused { code: c, message }) if c == code => Ok(message),
        other => bail!("expected refusal {code:#x}, got {other:?}"),
    }
}

#[test]
fn a_host_is_its_certificate_whatever_its_lease_option_claims() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path(), "cluster")?;
    let stranger = Pki::new(dir.path(), "stranger")?;
    let s = storage(dir.path(), &pki)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let tls_a = pki.client("a", "storage")?;
        let a = Client::connect(&lease(&s, "a", RequestedState::Primary).with_tls(tls_a.clone()))
            .await?;
        a.write(0, vec![0xa5; 4096], true).await?;

        // b's certificate claiming to be a (the primary's host and instance): refused.
        let tls_b = pki.client("b", "storage")?;
        let claim = lease(&s, "a", RequestedState::Primary).with_tls(tls_b.clone());
        let why = refused_with(Client::connect(&claim).await, NBD_REP_ERR_POLICY)?;
        ensure!(why.contains("proves host b"), "{why}");
        // A certificate of another CA naming host a: the TLS handshake fails.
        let fake =
            lease(&s, "a", RequestedState::Primary).with_tls(stranger.client("a", "storage")?);
        match Client::connect(&fake).await {
            Err(ClientError::TlsHandshake(_)) | Err(ClientError::Unreachable { .. }) => {}
            other => bail!("a stranger's certificate was accepted: {other:?}"),
        }
        // Plaintext, when TLS is required: refused before any lease is looked at.
        let plain = lease(&s, "a", RequestedState::Primary);
        refused_with(Client::connect(&plain).await, NBD_REP_ERR_TLS_REQD)?;
        // A client that expects another server: its own check fails.
        let wrong_server = lease(&s, "b", RequestedState::Standby).with_tls(pki.client("b", "b")?);
        ensure!(Client::connect(&wrong_server).await.is_err());

        // The real b, as itself: standby. The primary was never disturbed.
        let b = Client::connect(&lease(&s, "b", RequestedState::Standby).with_tls(tls_b)).await?;
        ensure!(
            b.lease() == Some((RequestedState::Standby, 1)),
            "{:?}",
            b.lease()
        );
        // Even as itself, b cannot take the volume on its own: only the control plane flips
        // (the volume was not created with --flip-over-nbd and nothing is armed for b).
        let flip = b.flip().await;
        ensure!(matches!(flip, Err(ClientError::NotPermitted)), "{flip:?}");
        ensure!(a.read(0, 4096).await? == vec![0xa5; 4096]);
        a.write(4096, vec![1; 4096], false).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    let leases = s.cli(&["lease", "list", "vol"])?;
    ensure!(leases.contains("epoch 1"), "{leases}");
    Ok(())
}

#[test]
fn a_host_off_the_volumes_list_gets_no_lease_until_the_operator_adds_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path(), "cluster")?;
    let mut s = storage(dir.path(), &pki)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let a = Client::connect(
            &lease(&s, "a", RequestedState::Primary).with_tls(pki.client("a", "storage")?),
        )
        .await?;
        // Host c has a valid certificate of the cluster but is not on the volume's list: no
        // standby lease, so it can never flip the volume away from a.
        let c = lease(&s, "c", RequestedState::Standby).with_tls(pki.client("c", "storage")?);
        let why = refused_with(Client::connect(&c).await, NBD_REP_ERR_POLICY)?;
        ensure!(why.contains("not on its host list"), "{why}");
        ensure!(a.write(0, vec![7; 512], true).await.is_ok());

        let out = s.cli(&[
            "--json", "volume", "access", "vol", "--host", "a", "--host", "c",
        ])?;
        ensure!(out.contains("\"c\""), "{out}");
        let c = Client::connect(&c).await?;
        ensure!(c.lease() == Some((RequestedState::Standby, 1)));
        Ok::<_, anyhow::Error>(())
    })?;
    // The list survives a restart of storaged.
    let tls_dir = pki.host("storage")?;
    s.restart(&["--tls-dir", tls_dir.to_str().unwrap_or_default()])?;
    let shown = s.cli(&["volume", "show", "vol"])?;
    ensure!(
        shown.contains("\"c\"") && !shown.contains("\"b\""),
        "{shown}"
    );
    Ok(())
}

#[test]
fn unmodified_clients_use_tls_with_x509_certificates_and_are_refused_without() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path(), "cluster")?;
    let s = storage(dir.path(), &pki)?;
    s.cli(&[
        "volume",
        "access",
        "vol",
        "--anonymous",
        "read-write-without-primary",
    ])?;
    let admin = pki.host("admin")?;
    let port = s.nbd.port().to_string();
    let creds = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        admin.display()
    );
    let opts = format!("driver=nbd,host=127.0.0.1,port={port},export=vol,tls-creds=tls0");

    // qemu-io writes a pattern over TLS, qemu-img reads the volume's size, nbdinfo lists it.
    run_ok(Command::new("qemu-io").args([
        "--object",
        &creds,
        "--image-opts",
        &opts,
        "-c",
        "write -P 0x3c 0 64k",
        "-c",
        "read -P 0x3c 0 64k",
    ]))?;
    let info =
        run_ok(Command::new("qemu-img").args(["info", "--object", &creds, "--image-opts", &opts]))?;
    let info = String::from_utf8(info.stdout)?;
    ensure!(info.contains("16 MiB"), "{info}");
    let uri = |d: &Path| {
        format!(
            "nbds://127.0.0.1:{port}/vol?tls-certificates={}",
            d.display()
        )
    };
    let out = run_ok(Command::new("nbdinfo").arg(uri(&admin)))?;
    let out = String::from_utf8(out.stdout)?;
    ensure!(out.contains("TLS") && out.contains("16777216"), "{out}");

    // Without a client certificate, or without TLS at all: refused.
    let ca_only = pki.ca_only()?;
    for cmd in [
        Command::new("nbdinfo").arg(uri(&ca_only)).output()?,
        Command::new("nbdinfo")
            .arg(format!("nbd://127.0.0.1:{port}/vol"))
            .output()?,
        Command::new("qemu-img")
            .args(["info", &format!("nbd://127.0.0.1:{port}/vol")])
            .output()?,
    ] {
        ensure!(
            !cmd.status.success(),
            "a client without a certificate got in: {}",
            String::from_utf8_lossy(&cmd.stdout)
        );
    }
    Ok(())
}

#[test]
fn loopback_clients_may_skip_tls_unless_told_otherwise() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path(), "cluster")?;
    let tls_dir = pki.host("storage")?;
    let s = Storaged::start_with(
        dir.path(),
        &["--tls-dir", tls_dir.to_str().unwrap_or_default()],
    )?;
    s.create_volume("vol", "16M", &[])?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        // Plaintext from loopback: accepted, the lease option taken at its word.
        let plain = Client::connect(&lease(&s, "a", RequestedState::Primary)).await?;
        plain.write(0, vec![1; 512], true).await?;
        // TLS still works beside it, and binds the identity.
        let b = lease(&s, "b", RequestedState::Standby).with_tls(pki.client("b", "storage")?);
        Client::connect(&b).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    ensure!(
        s.log().contains("loopback clients may use plaintext"),
        "{}",
        s.log()
    );
    Ok(())
}
