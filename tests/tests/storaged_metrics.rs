//! storaged's `GET /metrics`, scraped from a real storaged before and after real work: NBD
//! writes and reads by qemu-io, lease holders connecting, a lease refused, a standby's write
//! refused, a flip. Each scrape is parsed by the exposition format's grammar
//! (`e2e::metrics`), and the values must have moved as the work says.

use anyhow::{ensure, Result};
use e2e::metrics::{scrape_tcp, Exposition, Kind};
use e2e::process::{run_ok, wait_for};
use e2e::storaged::{client_config, Storaged, DEADLINE};
use std::process::Command;
use storaged_client::nbd::Client;
use storaged_client::protocol::RequestedState::{Primary, Standby};

const V: (&str, &str) = ("volume", "vol");

fn scrape(s: &Storaged) -> Result<Exposition> {
    scrape_tcp(&s.api.to_string(), None)
}

#[test]
fn metrics_move_with_nbd_io_leases_refusals_and_flips() -> Result<()> {
    let (_d, s) =
        Storaged::start_with_volume("vol", "16M", &["--anonymous", "read-write-without-primary"])?;
    let before = scrape(&s)?;
    before.check_names("storaged_")?;
    for (name, kind) in [
        ("storaged_volume_requests_total", Kind::Counter),
        ("storaged_volume_request_duration_seconds", Kind::Histogram),
        ("storaged_volume_written_bytes_total", Kind::Counter),
        ("storaged_volume_leases", Kind::Gauge),
        ("storaged_connections", Kind::Gauge),
        ("storaged_flips_total", Kind::Counter),
        ("storaged_flip_step_duration_seconds", Kind::Histogram),
        ("storaged_connections_refused_total", Kind::Counter),
        ("storaged_requests_refused_total", Kind::Counter),
    ] {
        ensure!(
            before.kind(name) == Some(kind),
            "{name}: {:?}",
            before.kind(name)
        );
    }
    ensure!(before.value("storaged_volume_size_bytes", &[V])? == (16 << 20) as f64);
    ensure!(before.value("storaged_volume_leases", &[V, ("state", "primary")])? == 0.0);
    ensure!(before.sum("storaged_volume_written_bytes_total", &[V]) == 0.0);

    // A real client's writes and reads, anonymously (no primary yet).
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 7 0 1M",
        "-c",
        "read -P 7 0 256k",
        &s.uri("vol"),
    ]))?;
    let io = wait_for("qemu-io's connection to end", DEADLINE, || {
        let m = scrape(&s).ok()?;
        (m.value("storaged_connections", &[]).ok()? == 0.0).then_some(m)
    })?;
    io.check_names("storaged_")?;
    let write = [V, ("op", "write")];
    ensure!(io.value("storaged_volume_written_bytes_total", &[V])? >= (1 << 20) as f64);
    ensure!(io.value("storaged_volume_read_bytes_total", &[V])? >= (256 << 10) as f64);
    ensure!(io.value("storaged_volume_requests_total", &write)? >= 1.0);
    ensure!(io.value("storaged_volume_request_errors_total", &write)? == 0.0);
    let writes = io.value("storaged_volume_requests_total", &write)?;
    let timed = io.value("storaged_volume_request_duration_seconds_count", &write)?;
    ensure!(timed == writes, "{timed} writes timed, {writes} answered");
    ensure!(io.value("storaged_volume_request_duration_seconds_sum", &write)? > 0.0);

    // Lease holders, a conflicting primary, a standby's write, a flip.
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let a = Client::connect(&client_config(&s, "vol", "host-a", Primary)).await?;
        a.write(0, vec![1; 4096], true).await?;
        let b = Client::connect(&client_config(&s, "vol", "host-b", Standby)).await?;
        let held = scrape(&s)?;
        ensure!(held.value("storaged_volume_leases", &[V, ("state", "primary")])? == 1.0);
        ensure!(held.value("storaged_volume_leases", &[V, ("state", "standby")])? == 1.0);
        ensure!(held.value("storaged_volume_connections", &[V])? == 2.0);
        ensure!(held.value("storaged_connections", &[])? == 2.0);

        let c = Client::connect(&client_config(&s, "vol", "host-c", Primary)).await;
        ensure!(c.is_err(), "a second primary was granted");
        ensure!(
            b.write(0, vec![2; 4096], true).await.is_err(),
            "a standby wrote"
        );

        s.cli(&["lease", "flip", "vol"])?;
        b.write(0, vec![3; 4096], true).await?;
        let flipped = scrape(&s)?;
        let refused =
            |m: &Exposition, r| m.sum("storaged_connections_refused_total", &[("reason", r)]);
        ensure!(refused(&flipped, "lease") >= refused(&held, "lease") + 1.0);
        let standby = [("reason", "standby")];
        ensure!(flipped.value("storaged_requests_refused_total", &standby)? >= 1.0);
        ensure!(flipped.value("storaged_flips_total", &[("trigger", "api")])? == 1.0);
        for step in [
            "deactivate",
            "drain",
            "disconnect",
            "persist",
            "promote",
            "total",
        ] {
            let count = "storaged_flip_step_duration_seconds_count";
            ensure!(
                flipped.value(count, &[("step", step)])? == 1.0,
                "step {step}"
            );
        }
        ensure!(flipped.value("storaged_volume_leases", &[V, ("state", "deactivated")])? == 1.0);
        ensure!(flipped.value("storaged_volume_leases", &[V, ("state", "standby")])? == 0.0);
        ensure!(
            flipped.value("storaged_volume_epoch", &[V])?
                > held.value("storaged_volume_epoch", &[V])?
        );
        ensure!(
            flipped.value("storaged_volume_requests_total", &write)? >= writes + 2.0,
            "the lease holders' writes are counted"
        );
        Ok(())
    })
}

#[test]
fn metrics_answer_only_with_the_token_when_the_api_has_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123")?;
    let s = Storaged::start_with(dir.path(), &["--api-token-file", token.to_str().unwrap()])?;
    ensure!(scrape(&s).is_err(), "metrics answered without the token");
    let m = scrape_tcp(&s.api.to_string(), Some("0123456789abcdef0123"))?;
    m.check_names("storaged_")?;
    Ok(())
}
