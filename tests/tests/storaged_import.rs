//! Putting an image on a volume: `storaged volume import` (over NBD under a lease of its own,
//! released at the end; refused while another host is primary unless `--force`; in TLS with
//! a host's certificate) and `storaged volume set-access`, which lets unmodified NBD tools
//! without a lease write to a volume.

use anyhow::{ensure, Result};
use e2e::pki::Pki;
use e2e::storaged::{client_config, Storaged};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};
use storaged_client::nbd::Client;
use storaged_client::protocol::RequestedState;

const MIB: usize = 1 << 20;

/// `storaged volume import ARGS` against `s`; the output whether it succeeded or not.
fn import(s: &Storaged, args: &[&str]) -> Result<Output> {
    Ok(Command::new(e2e::binary("storaged"))
        .args(["volume", "import"])
        .args(args)
        .args(["--api", &s.api.to_string(), "--nbd", &s.nbd.to_string()])
        .output()?)
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The volume's content, read by qemu-img as an anonymous client.
fn volume_content(s: &Storaged, volume: &str, dir: &Path) -> Result<Vec<u8>> {
    let back = dir.join(format!("{volume}.back"));
    e2e::process::run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &s.uri(volume)])
            .arg(&back),
    )?;
    Ok(std::fs::read(back)?)
}

/// Data, then a chunk of zeroes, then data; `extra` bytes after whole MiBs.
fn image(dir: &Path, extra: usize) -> Result<(std::path::PathBuf, Vec<u8>)> {
    let mut data: Vec<u8> = (0..12 * MIB + extra)
        .map(|i| (i * 13 + i / 4096) as u8 | 1)
        .collect();
    data[4 * MIB..8 * MIB].fill(0);
    let path = dir.join("image.raw");
    std::fs::write(&path, &data)?;
    Ok((path, data))
}

#[test]
fn import_creates_the_volume_with_the_files_size_and_releases_its_lease() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Storaged::start(dir.path())?;
    let (path, data) = image(dir.path(), 100)?;
    let out = import(&s, &["--json", "root", path.to_str().unwrap_or_default()])?;
    ensure!(out.status.success(), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout)?;
    let rounded = (data.len() as u64).div_ceil(512) * 512;
    ensure!(
        report["created"] == true
            && report["volume_size"] == rounded
            && report["bytes"] == data.len() as u64
            && report["data_bytes"] == (data.len() - 4 * MIB) as u64
            && report["lease_host"] == "storaged-import",
        "{report}"
    );
    // No lease is left behind, so an anonymous reader (and later a guest) may open it.
    let leases: Value = serde_json::from_str(&s.cli(&["--json", "lease", "list", "root"])?)?;
    ensure!(leases["leases"] == serde_json::json!([]), "{leases}");
    let got = volume_content(&s, "root", dir.path())?;
    ensure!(got.len() as u64 == rounded, "{} bytes", got.len());
    ensure!(
        got[..data.len()] == data[..],
        "the volume differs from the file"
    );
    ensure!(got[data.len()..].iter().all(|&b| b == 0));

    // Text output says what happened; a volume smaller than the file is refused.
    s.create_volume("small", "1M", &[])?;
    let out = import(&s, &["small", path.to_str().unwrap_or_default()])?;
    ensure!(!out.status.success(), "{}", text(&out));
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("fewer than"),
        "{}",
        text(&out)
    );
    Ok(())
}

#[test]
fn import_refuses_a_volume_with_a_primary_unless_forced_and_overwrites_old_data() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Storaged::start(dir.path())?;
    s.create_volume("disk", "16M", &[])?;
    let (path, data) = image(dir.path(), 0)?;
    let path = path.to_str().unwrap_or_default().to_string();
    let rt = tokio::runtime::Runtime::new()?;
    let a = rt.block_on(async {
        let a = Client::connect(&client_config(&s, "disk", "a", RequestedState::Primary)).await?;
        for off in (0..16 * MIB).step_by(4 * MIB) {
            a.write(off as u64, vec![0xff; 4 * MIB], false).await?;
        }
        a.flush().await?;
        Ok::<_, anyhow::Error>(a)
    })?;

    let out = import(&s, &["disk", &path])?;
    ensure!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("primary lease held by host a") && err.contains("--force"),
        "{}",
        text(&out)
    );
    let untouched = rt.block_on(a.read(0, 4096))?;
    ensure!(untouched.iter().all(|&b| b == 0xff), "refused, yet written");

    let out = import(&s, &["disk", &path, "--force"])?;
    ensure!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(
        said.contains("revoked host a's primary lease") && said.contains("imported"),
        "{}",
        text(&out)
    );
    // Host a was fenced.
    ensure!(rt.block_on(a.write(0, vec![1; 512], false)).is_err());
    let got = volume_content(&s, "disk", dir.path())?;
    // The zero chunk overwrote the old 0xff; past the file's end the old data stays.
    ensure!(
        got[..data.len()] == data[..],
        "the volume differs from the file"
    );
    ensure!(got[data.len()..].iter().all(|&b| b == 0xff));
    Ok(())
}

#[test]
fn import_over_tls_holds_the_lease_as_the_certificates_host() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path(), "cluster")?;
    let tls_dir = pki.host("storage")?;
    let s = Storaged::start_tls_only(dir.path(), &tls_dir)?;
    s.create_volume("vol", "16M", &["--host", "a"])?;
    let (path, data) = image(dir.path(), 0)?;
    let path = path.to_str().unwrap_or_default();

    let out = import(&s, &["vol", path])?;
    ensure!(!out.status.success(), "{}", text(&out));
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("TLS"),
        "{}",
        text(&out)
    );

    let a = pki.host("a")?;
    let a = a.to_str().unwrap_or_default();
    let out = import(
        &s,
        &["vol", path, "--tls-dir", a, "--server-name", "storage"],
    )?;
    ensure!(out.status.success(), "{}", text(&out));
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("(host a) released"),
        "{}",
        text(&out)
    );
    let rt = tokio::runtime::Runtime::new()?;
    let got = rt.block_on(async {
        let cfg = client_config(&s, "vol", "a", RequestedState::Primary)
            .with_tls(pki.client("a", "storage")?);
        let c = Client::connect(&cfg).await?;
        let mut got = Vec::new();
        for off in (0..data.len()).step_by(4 * MIB) {
            got.extend(c.read(off as u64, 4 * MIB).await?);
        }
        Ok::<_, anyhow::Error>((c, got))
    })?;
    ensure!(got.1 == data, "the volume differs from the file");
    // Host a's own guest holds the volume now: an import as host a is refused all the same.
    let out = import(
        &s,
        &["vol", path, "--tls-dir", a, "--server-name", "storage"],
    )?;
    ensure!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("primary lease held by host a"),
        "{}",
        text(&out)
    );
    ensure!(rt.block_on(got.0.write(0, vec![1; 512], true)).is_ok());
    Ok(())
}

#[test]
fn set_access_lets_tools_without_a_lease_write_and_says_why_they_could_not() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Storaged::start(dir.path())?;
    s.create_volume("v", "8M", &[])?;
    let write = || {
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 0 1M", &s.uri("v")])
            .output()
    };
    let out = write()?;
    let said = text(&out);
    ensure!(
        !out.status.success() || said.contains("failed"),
        "a write without a lease passed: {said}"
    );

    // qemu says only "Permission denied"; the export's description says why, and what to do.
    let info = e2e::process::run_ok(Command::new("nbdinfo").arg(s.uri("v")))?;
    let info = String::from_utf8_lossy(&info.stdout);
    ensure!(
        info.contains("read-only for clients without a lease")
            && info.contains("storaged volume set-access v read-write-without-primary"),
        "{info}"
    );

    let out = s.cli(&["volume", "set-access", "v", "read-write-without-primary"])?;
    ensure!(
        out.contains("anonymous access read-write-without-primary"),
        "{out}"
    );
    let out = write()?;
    let said = text(&out);
    ensure!(out.status.success() && !said.contains("failed"), "{said}");
    let got = volume_content(&s, "v", dir.path())?;
    ensure!(got[..MIB].iter().all(|&b| b == 0x5a));
    Ok(())
}
