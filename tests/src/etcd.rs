//! A real etcd (Debian's `etcd-server`, /usr/bin/etcd) for the cluster-mode tests: one member
//! on loopback ports, its own data directory, killed on drop.

use crate::process::wait_for;
use anyhow::{Context, Result};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The etcd binary the setup script installs.
pub const ETCD: &str = "/usr/bin/etcd";

/// A running single-member etcd.
pub struct Etcd {
    child: Child,
    /// Client URL (`http://127.0.0.1:PORT`).
    pub endpoint: String,
}

/// A free loopback port (bound and released; etcd takes ports only as numbers).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Etcd {
    /// Starts etcd with its data in `dir/etcd` and waits until it serves clients. Fails with
    /// the command that installs it when the binary is missing.
    pub fn start(dir: &Path) -> Result<Etcd> {
        anyhow::ensure!(
            Path::new(ETCD).exists(),
            "{ETCD} is missing: run scripts/setup (it installs Debian's etcd-server)"
        );
        let (client, peer) = (free_port()?, free_port()?);
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log_path = dir.join("etcd.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(ETCD)
            .args(["--name", "n0", "--data-dir"])
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("n0={peer_url}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning etcd")?;
        let mut e = Etcd { child, endpoint };
        wait_for("etcd to serve clients", crate::storaged::DEADLINE, || {
            if let Ok(Some(st)) = e.child.try_wait() {
                return Some(Err(anyhow::anyhow!("etcd exited early: {st}")));
            }
            let log = std::fs::read_to_string(&log_path).ok()?;
            log.contains("ready to serve client requests")
                .then_some(Ok(()))
        })??;
        Ok(e)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
