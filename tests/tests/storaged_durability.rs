//! Durability and lifecycle: kill -9 after acknowledged writes and lease changes, restart;
//! SIGTERM finishes admitted requests and exits 0; volumes through the CLI.

use anyhow::{bail, ensure, Result};
use e2e::process::wait_for;
use e2e::storaged::{client_config, Storaged, DEADLINE};
use storaged_client::nbd::{Client, ClientError};
use storaged_client::protocol::RequestedState::{Primary, Standby};

fn pattern(i: u64) -> Vec<u8> {
    (0..65536u64).map(|j| (i * 13 + j) as u8).collect()
}

#[test]
fn kill_9_keeps_data_and_the_lease_table() -> Result<()> {
    let (_dir, mut s) = Storaged::start_with_volume("vol", "64M", &["--flip-over-nbd"])?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let a = Client::connect(&client_config(&s, "vol", "host-a", Primary)).await?;
        let b = Client::connect(&client_config(&s, "vol", "host-b", Standby)).await?;
        for i in 0..64 {
            a.write(i * 65536, pattern(i), i % 2 == 0).await?;
        }
        a.flush().await?;
        b.flip().await?;
        for i in 64..128 {
            b.write(i * 65536, pattern(i), true).await?;
        }
        anyhow::Ok(())
    })?;
    s.restart(&[])?;
    let leases = s.cli(&["lease", "list", "vol"])?;
    ensure!(leases.contains("epoch 2"), "{leases}");
    ensure!(
        leases
            .lines()
            .any(|l| l.starts_with("host-a") && l.contains("deactivated")),
        "{leases}"
    );
    ensure!(
        leases
            .lines()
            .any(|l| l.starts_with("host-b") && l.contains("primary")),
        "{leases}"
    );
    rt.block_on(async {
        match Client::connect(&client_config(&s, "vol", "host-a", Primary)).await {
            Err(ClientError::Deactivated { .. }) => {}
            other => bail!("host-a must stay deactivated after a restart: {other:?}"),
        }
        let b = Client::connect(&client_config(&s, "vol", "host-b", Primary)).await?;
        assert_eq!(b.lease(), Some((Primary, 2)));
        for i in 0..128 {
            ensure!(
                b.read(i * 65536, 65536).await? == pattern(i),
                "block {i} lost"
            );
        }
        Ok(())
    })?;
    // Rollback information survives as well.
    let out = s.rollback("vol", 2, "host-b")?;
    ensure!(out.contains("\"epoch\": 3"), "{out}");
    Ok(())
}

#[test]
fn sigterm_finishes_admitted_requests_and_exits_zero() -> Result<()> {
    let (_dir, mut s) = Storaged::start_with_volume("vol", "64M", &[])?;
    let rt = tokio::runtime::Runtime::new()?;
    let (acked, c) = rt.block_on(async {
        let c = Client::connect(&client_config(&s, "vol", "host-a", Primary)).await?;
        let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        for t in 0..8u64 {
            let (c, acked) = (c.clone(), acked.clone());
            tokio::spawn(async move {
                for i in 0.. {
                    let blk = t * 128 + i % 128;
                    if c.write(blk * 65536, pattern(blk), false).await.is_err() {
                        break;
                    }
                    acked.lock().unwrap().push(blk);
                }
            });
        }
        e2e::process::wait_for("writes", e2e::storaged::DEADLINE, || {
            (acked.lock().unwrap().len() > 100).then_some(())
        })?;
        anyhow::Ok((acked, c))
    })?;
    let status = s.terminate()?;
    ensure!(status.success(), "storaged exited with {status}");
    ensure!(s.log().contains("storaged stopped cleanly"));
    let _ = c;
    let file = std::fs::read(s.volume_file("vol"))?;
    for blk in acked.lock().unwrap().iter() {
        let at = *blk as usize * 65536;
        ensure!(
            file[at..at + 65536] == pattern(*blk)[..],
            "acknowledged block {blk} missing"
        );
    }
    Ok(())
}

#[test]
fn volumes_through_the_cli_survive_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = Storaged::start(dir.path())?;
    s.create_volume("one", "1G", &["--anonymous", "deny"])?;
    s.create_volume("two", "4M", &[])?;
    ensure!(s.create_volume("one", "1M", &[]).is_err(), "duplicate name");
    ensure!(s.create_volume("bad/name", "1M", &[]).is_err());
    ensure!(s.create_volume("odd", "1000", &[]).is_err());
    let show = s.cli(&["volume", "show", "one"])?;
    ensure!(
        show.contains("\"anonymous\": \"deny\"") && show.contains("1073741824"),
        "{show}"
    );
    // A sparse file: 1 GiB apparent, almost nothing allocated.
    let meta = std::fs::metadata(s.volume_file("one"))?;
    ensure!(std::os::unix::fs::MetadataExt::blocks(&meta) < 1024);
    s.restart(&[])?;
    let list = s.cli(&["volume", "list"])?;
    ensure!(list.contains("one") && list.contains("two"), "{list}");
    let rt = tokio::runtime::Runtime::new()?;
    let c = rt.block_on(Client::connect(&client_config(&s, "two", "h", Primary)))?;
    ensure!(
        s.cli(&["volume", "delete", "two"]).is_err(),
        "busy volume must not be deleted"
    );
    rt.block_on(c.disconnect())?;
    drop(c);
    e2e::process::wait_for("the connection to close", e2e::storaged::DEADLINE, || {
        s.cli(&["volume", "show", "two"])
            .ok()
            .filter(|o| o.contains("\"connections\": 0"))
    })?;
    s.cli(&["volume", "delete", "two"])?;
    ensure!(!s.volume_file("two").exists());
    s.restart(&[])?;
    ensure!(!s.cli(&["volume", "list"])?.contains("two"));
    Ok(())
}

#[test]
fn readiness_is_notified_to_systemd() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path)?;
    sock.set_read_timeout(Some(e2e::storaged::DEADLINE))?;
    let work = dir.path().join("work");
    std::fs::create_dir(&work)?;
    let mut s = Storaged::start_with_env(
        &work,
        &[],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    )?;
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf)?;
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    ensure!(msg.contains("READY=1"), "{msg}");
    ensure!(s.terminate()?.success());
    let n = sock.recv(&mut buf)?;
    ensure!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    Ok(())
}

#[test]
fn config_file_is_read_and_bad_ones_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("storaged.toml");
    std::fs::write(
        &cfg,
        "shutdown_grace_secs = 5\ndrain_limit_secs = 5\nmax_connections_per_volume = 1\n",
    )?;
    let work = dir.path().join("work");
    std::fs::create_dir(&work)?;
    let s = Storaged::start_with(&work, &["--config", cfg.to_str().unwrap()])?;
    s.create_volume("v", "4M", &["--anonymous", "read-write-without-primary"])?;
    e2e::process::run_ok(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x42 0 64k",
        "-c",
        "read -P 0x42 0 64k",
        &s.uri("v"),
    ]))?;
    // One connection per volume (max_connections_per_volume = 1): a second one is refused.
    let rt = tokio::runtime::Runtime::new()?;
    let _primary = rt.block_on(Client::connect(&client_config(&s, "v", "a", Primary)))?;
    let second = rt.block_on(Client::connect(&client_config(&s, "v", "b", Standby)));
    ensure!(
        matches!(second, Err(ClientError::Refused { .. })),
        "{second:?}"
    );
    std::fs::write(&cfg, "no_such_setting = 1\n")?;
    let out = std::process::Command::new(e2e::binary("storaged"))
        .args(["serve", "--config", cfg.to_str().unwrap(), "--data-dir"])
        .arg(dir.path().join("other"))
        .output()?;
    ensure!(!out.status.success());
    ensure!(String::from_utf8_lossy(&out.stderr).contains("no_such_setting"));
    Ok(())
}

/// Kills `s` and starts it again on the same data with the environment `env`.
fn restart_with_env(s: &mut Storaged, env: &[(&str, &str)]) -> Result<()> {
    s.kill9();
    let work = s.work_dir.clone();
    *s = Storaged::start_with_env(&work, &[], env)?;
    Ok(())
}

/// Writes `pattern` over the first MiB of `volume`.
fn fill(s: &Storaged, volume: &str, pattern: u8) -> Result<()> {
    let cmd = format!("write -P {pattern} 0 1M");
    e2e::process::run_ok(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        &cmd,
        &s.uri(volume),
    ]))?;
    Ok(())
}

/// Whether the first MiB of `volume` reads as zeroes.
fn reads_zeroes(s: &Storaged, volume: &str) -> Result<bool> {
    let out = e2e::process::run_ok(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        "-r",
        "-c",
        "read -P 0 0 1M",
        &s.uri(volume),
    ]))?;
    Ok(!String::from_utf8_lossy(&out.stdout).contains("verification failed"))
}

const RW: [&str; 2] = ["--anonymous", "read-write-without-primary"];

#[test]
fn a_volume_created_again_never_shows_a_deleted_ones_data() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = Storaged::start(dir.path())?;
    s.create_volume("x", "4M", &RW)?;
    fill(&s, "x", 0x5a)?;
    // A delete that died after forgetting the volume but before removing its file leaves the
    // file behind: put it back by hand as such a crash would have left it.
    let file = s.volume_file("x");
    let kept = dir.path().join("x.kept");
    std::fs::copy(&file, &kept)?;
    s.cli(&["volume", "delete", "x"])?;
    s.kill9();
    std::fs::rename(&kept, &file)?;
    s.restart(&[])?;
    ensure!(
        s.cli(&["volume", "show", "x"]).is_err(),
        "a deleted volume came back"
    );
    s.create_volume("x", "4M", &RW)?;
    ensure!(
        reads_zeroes(&s, "x")?,
        "the new volume shows the deleted one's data"
    );
    Ok(())
}

/// Makes `s` die at `step` while `act` runs, starts it again and checks that `volume` is gone,
/// record and file, and starts empty when created again.
fn crash_at(
    s: &mut Storaged,
    step: &str,
    volume: &str,
    act: impl FnOnce(&Storaged) -> Result<()>,
) -> Result<()> {
    restart_with_env(s, &[(vmhop_common::faults::CRASH_AT, step)])?;
    ensure!(act(s).is_err(), "{step}: storaged did not die");
    wait_for("storaged to die", DEADLINE, || {
        (!s.is_running()).then_some(())
    })?;
    ensure!(
        s.volume_file(volume).exists(),
        "{step}: not between the steps"
    );
    restart_with_env(s, &[])?;
    ensure!(
        s.cli(&["volume", "show", volume]).is_err(),
        "{step}: {volume} exists"
    );
    ensure!(
        !s.volume_file(volume).exists(),
        "{step}: the file of {volume} stayed"
    );
    s.create_volume(volume, "4M", &RW)?;
    ensure!(reads_zeroes(s, volume)?, "{step}: {volume} shows old data");
    Ok(())
}

#[test]
fn kill_9_between_the_steps_of_create_and_delete_leaves_no_half_volume() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = Storaged::start(dir.path())?;
    s.create_volume("x", "4M", &RW)?;
    fill(&s, "x", 0x5a)?;
    // Dies after removing the record, before removing the file.
    crash_at(&mut s, "volume.delete.record", "x", |s| {
        s.cli(&["volume", "delete", "x"]).map(drop)
    })?;
    // Dies after creating the file, before writing the record.
    crash_at(&mut s, "volume.create.file", "y", |s| {
        s.create_volume("y", "4M", &RW)
    })?;
    ensure!(
        reads_zeroes(&s, "x")?,
        "x lost its state across the restarts"
    );
    Ok(())
}
