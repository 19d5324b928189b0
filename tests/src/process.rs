//! Child processes and conditions in the tests: waiting for a condition with a deadline,
//! running a command that must succeed.

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

/// Polls `cond` until it returns `Some` or `limit` passes.
pub fn wait_for<T>(what: &str, limit: Duration, mut cond: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = cond() {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls the async `cond` until it returns `Some` or `limit` passes (without blocking the
/// runtime's thread between polls).
pub async fn wait_for_async<T, F, Fut>(what: &str, limit: Duration, mut cond: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = cond().await {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends SIGTERM to `child` (`what` names it) and waits up to `limit` for it to exit.
pub fn terminate(child: &mut Child, what: &str, limit: Duration) -> Result<ExitStatus> {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM)
        .with_context(|| format!("SIGTERM to {what}"))?;
    wait_for(&format!("{what} to exit"), limit, || {
        child.try_wait().ok().flatten()
    })
}

/// Runs a command and fails with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Whether process `pid` is stopped (SIGSTOP: a fault point's stall, say).
pub fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}
