//! Lease transitions on a running storaged: already-primary retry, conflicts, epochs, flip on
//! first access, armed flips with a deadline, rollback, revoke, the address fallback, and an
//! API that takes only requests carrying its token.

use anyhow::{bail, ensure, Result};
use e2e::process::wait_for;
use e2e::storaged::{client_config, Storaged, DEADLINE};
use std::time::Duration;
use storaged_client::nbd::{Client, ClientConfig, ClientError};
use storaged_client::protocol::RequestedState::{self, Primary, Standby};

fn setup(extra: &[&str]) -> Result<(tempfile::TempDir, Storaged, tokio::runtime::Runtime)> {
    let (dir, s) = Storaged::start_with_volume("vol", "16M", extra)?;
    Ok((dir, s, tokio::runtime::Runtime::new()?))
}

async fn connect(s: &Storaged, host: &str, state: RequestedState) -> Result<Client, ClientError> {
    Client::connect(&client_config(s, "vol", host, state)).await
}

fn lease_line(s: &Storaged, host: &str) -> Result<String> {
    let out = s.cli(&["lease", "list", "vol"])?;
    Ok(out
        .lines()
        .find(|l| l.starts_with(host))
        .unwrap_or("")
        .to_string())
}

#[test]
fn standby_request_from_the_primary_host_is_retried_as_primary() -> Result<()> {
    let (_d, s, rt) = setup(&[])?;
    rt.block_on(async {
        let a = connect(&s, "host-a", Primary).await?;
        a.write(0, vec![1; 4096], true).await?;
        // The same host reconnecting as standby (e.g. after restarting its VMM) gets primary.
        let again = connect(&s, "host-a", Standby).await?;
        assert_eq!(again.lease(), Some((Primary, 1)));
        assert_eq!(again.read(0, 4096).await?, vec![1; 4096]);
        Ok(())
    })
}

#[test]
fn second_primary_and_stale_epoch_are_refused() -> Result<()> {
    let (_d, s, rt) = setup(&[])?;
    rt.block_on(async {
        let _a = connect(&s, "host-a", Primary).await?;
        match connect(&s, "host-c", Primary).await {
            Err(ClientError::Conflict { message }) => ensure!(message.contains("host-a")),
            other => bail!("expected a conflict, got {other:?}"),
        }
        let mut cfg = client_config(&s, "vol", "host-b", Standby);
        cfg.lease.as_mut().unwrap().expected_epoch = 7;
        match Client::connect(&cfg).await {
            Err(ClientError::EpochMismatch { message }) => ensure!(message.contains("7")),
            other => bail!("expected an epoch mismatch, got {other:?}"),
        }
        cfg.lease.as_mut().unwrap().expected_epoch = 1;
        Client::connect(&cfg).await?;
        Ok(())
    })
}

#[test]
fn flip_on_first_access_promotes_the_standby() -> Result<()> {
    let (_d, s, rt) = setup(&["--flip-on-first-access"])?;
    rt.block_on(async {
        let a = connect(&s, "host-a", Primary).await?;
        a.write(0, vec![0xaa; 4096], false).await?;
        let b = connect(&s, "host-b", Standby).await?;
        // B's first read flips the lease and is then served.
        assert_eq!(b.read(0, 4096).await?, vec![0xaa; 4096]);
        b.write(4096, vec![0xbb; 4096], true).await?;
        ensure!(a.write(0, vec![0; 4096], false).await.is_err());
        Ok(())
    })?;
    ensure!(lease_line(&s, "host-b")?.contains("primary"));
    ensure!(lease_line(&s, "host-a")?.contains("deactivated"));
    Ok(())
}

#[test]
fn armed_flip_completes_at_its_deadline() -> Result<()> {
    let (_d, s, rt) = setup(&[])?;
    let (a, _b) = rt.block_on(async {
        let a = connect(&s, "host-a", Primary).await?;
        let b = connect(&s, "host-b", Standby).await?;
        anyhow::Ok((a, b))
    })?;
    let out = s.cli(&["lease", "flip", "vol", "--armed", "--timeout-ms", "300"])?;
    ensure!(out.contains("\"armed\": true"), "{out}");
    wait_for("the armed flip to complete", DEADLINE, || {
        lease_line(&s, "host-b")
            .ok()
            .filter(|l| l.contains("primary"))
    })?;
    rt.block_on(async {
        ensure!(a.read(0, 512).await.is_err());
        Ok(())
    })?;
    ensure!(s.log().contains("trigger=Timeout"), "{}", s.log());
    Ok(())
}

#[test]
fn armed_flip_completes_on_first_access_before_its_deadline() -> Result<()> {
    let (_d, s, rt) = setup(&[])?;
    rt.block_on(async {
        let _a = connect(&s, "host-a", Primary).await?;
        let b = connect(&s, "host-b", Standby).await?;
        s.cli(&["lease", "flip", "vol", "--armed", "--timeout-ms", "600000"])?;
        b.write(0, vec![3; 512], false).await?;
        anyhow::Ok(())
    })?;
    ensure!(lease_line(&s, "host-b")?.contains("primary"));
    ensure!(s.log().contains("trigger=FirstAccess"));
    Ok(())
}

#[test]
fn rollback_restores_the_previous_lease_table() -> Result<()> {
    let (_d, s, rt) = setup(&["--flip-over-nbd"])?;
    rt.block_on(async {
        let a = connect(&s, "host-a", Primary).await?;
        let b = connect(&s, "host-b", Standby).await?;
        a.write(0, vec![1; 512], false).await?;
        b.flip().await?;
        b.write(0, vec![2; 512], false).await?;
        // A rollback names the flip it undoes: b made primary at epoch 2.
        let stale = s.rollback("vol", 1, "host-b");
        ensure!(stale.is_err(), "{stale:?}");
        let out = s.rollback("vol", 2, "host-b")?;
        ensure!(out.contains("\"epoch\": 3"), "{out}");
        // B is standby again on its open connection; A may come back as primary.
        ensure!(matches!(
            b.write(0, vec![9; 512], false).await,
            Err(ClientError::NotPermitted)
        ));
        let a2 = connect(&s, "host-a", Primary).await?;
        assert_eq!(a2.lease(), Some((Primary, 3)));
        assert_eq!(a2.read(0, 512).await?, vec![2; 512]);
        drop(a);
        // Nothing left to roll back.
        ensure!(s.rollback("vol", 3, "host-a").is_err());
        Ok(())
    })
}

#[test]
fn revoke_terminates_leases() -> Result<()> {
    let (_d, s, rt) = setup(&["--flip-over-nbd"])?;
    rt.block_on(async {
        let _a = connect(&s, "host-a", Primary).await?;
        let b = connect(&s, "host-b", Standby).await?;
        b.flip().await?;
        ensure!(matches!(
            connect(&s, "host-a", Standby).await,
            Err(ClientError::Deactivated { .. })
        ));
        // Revoking the deactivated host lets it connect again (as standby).
        s.cli(&["lease", "revoke", "vol", "--host", "host-a"])?;
        let a = connect(&s, "host-a", Standby).await?;
        // A revoke limited to the standby state leaves the primary alone (409, unchanged).
        let refused = s
            .cli(&[
                "lease",
                "revoke",
                "vol",
                "--host",
                "host-b",
                "--only-if",
                "standby",
            ])
            .unwrap_err()
            .to_string();
        ensure!(refused.contains("not Standby"), "{refused}");
        ensure!(b.read(0, 512).await.is_ok());
        // Revoking the primary closes its connection.
        s.cli(&["lease", "revoke", "vol", "--host", "host-b"])?;
        ensure!(b.read(0, 512).await.is_err());
        ensure!(a.read(0, 512).await.is_err(), "still standby");
        Ok(())
    })?;
    ensure!(lease_line(&s, "host-b")?.is_empty());
    ensure!(s
        .cli(&["lease", "revoke", "vol", "--host", "nobody"])
        .is_err());
    Ok(())
}

#[test]
fn client_moves_on_to_the_next_address_and_reports_unreachable() -> Result<()> {
    let (_d, s, rt) = setup(&[])?;
    // A port with nothing listening: bind, note the port, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    rt.block_on(async {
        let mut cfg = ClientConfig::new(vec![dead.clone(), s.nbd.to_string()], "vol");
        cfg.backoff_initial = Duration::from_millis(1);
        let c = Client::connect(&cfg).await?;
        ensure!(c.size() == 16 << 20);
        let mut cfg = ClientConfig::new(vec![dead.clone()], "vol");
        cfg.backoff_initial = Duration::from_millis(1);
        cfg.rounds = 2;
        match Client::connect(&cfg).await {
            Err(ClientError::Unreachable { attempts: 2, .. }) => Ok(()),
            other => bail!("expected unreachable, got {other:?}"),
        }
    })
}

#[test]
fn an_api_with_a_token_refuses_requests_without_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let token = e2e::write_token(dir.path(), "storaged-api-secret-0123")?;
    let s = Storaged::start_with(dir.path(), &["--api-token-file", token.to_str().unwrap()])?;
    let api = s.api.to_string();
    // As an operator sees it: no backtrace (the test's environment may ask for them).
    let cli = |extra: &[&str]| {
        std::process::Command::new(e2e::binary("storaged"))
            .args(["volume", "create", "vol", "--size", "1M", "--api", &api])
            .args(extra)
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .output()
    };
    let out = cli(&[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "created without the token");
    // The cause in words, not the HTTP status (the API's address, which the message names,
    // may hold "401" in its port).
    ensure!(
        err.contains("missing bearer token") && !err.replace(&api, "").contains("401"),
        "{err}"
    );
    let other = tempfile::tempdir()?;
    let wrong = e2e::write_token(other.path(), "storaged-api-secret-0124")?;
    let out = cli(&["--token-file", wrong.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("wrong bearer token"), "{err}");
    let out = cli(&["--token-file", token.to_str().unwrap()])?;
    ensure!(out.status.success(), "{out:?}");
    ensure!(s.log().contains("request refused"), "{}", s.log());
    // The data path is unaffected: NBD clients need no token.
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let c = connect(&s, "host-a", Primary).await?;
        c.read(0, 512).await?;
        Ok(())
    })
}

#[test]
fn a_primary_that_resets_right_after_go_leaves_nothing_that_slows_the_flip() -> Result<()> {
    use e2e::nbd_socket::{greet, lease, reset, send_go};
    let (_d, s, rt) = setup(&[])?;
    // On 24 volumes, the primary asks for the volume and resets its socket a little later
    // each time, without reading the answer: some resets land while the server grants the
    // lease (a durable write), so its answer to NBD_OPT_GO fails after the connection was
    // attached.
    let volumes: Vec<String> = (0..24).map(|i| format!("v{i}")).collect();
    for (i, v) in volumes.iter().enumerate() {
        s.create_volume(v, "1M", &["--flip-over-nbd"])?;
        let mut t = greet(s.nbd)?;
        lease(&mut t, "host-a", Primary)?;
        send_go(&mut t, v)?;
        std::thread::sleep(Duration::from_micros(250 * i as u64));
        reset(t)?;
    }
    for v in &volumes {
        wait_for("the aborted connections to be gone", DEADLINE, || {
            let show = s.cli(&["volume", "show", v]).ok()?;
            show.contains("\"connections\": 0").then_some(())
        })?;
    }
    // A flip right after: nothing of the old primary is left to wait for (each leaked
    // connection used to hold every flip until its wait for the socket to close gave up).
    for v in &volumes {
        let b = rt.block_on(Client::connect(&client_config(&s, v, "host-b", Standby)))?;
        let rep = rt.block_on(b.flip())?;
        eprintln!("flip of {v}: {} us", rep.total_us);
    }
    ensure!(
        !s.log().contains("fenced connection slow to close"),
        "a flip waited for a connection that was gone:\n{}",
        s.log()
    );
    Ok(())
}
