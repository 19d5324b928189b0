//! A real etcd (Debian's `etcd-server`, /usr/bin/etcd) for the cluster-mode tests: one member,
//! or several forming one cluster, on ports of the given address, each member with its own
//! data directory; a member can be killed (SIGKILL) and started again on its data and ports.
//! Every member is killed on drop. A member can also be configured by `ETCD_*` variables
//! alone, as Debian's unit runs it.
//!
//! Members elect their leader with a short heartbeat and election timeout
//! ([`HEARTBEAT_MS`], [`ELECTION_MS`]): the storaged nodes' etcd leases in these tests last
//! two seconds, and etcd serves no lease keep-alive while it has no leader, so an election
//! must take well under the margin storaged keeps on its lease.

use crate::process::wait_for;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The etcd binary the setup script installs.
pub const ETCD: &str = "/usr/bin/etcd";

/// The members' raft heartbeat interval (ms).
pub const HEARTBEAT_MS: &str = "25";
/// The members' election timeout (ms).
pub const ELECTION_MS: &str = "250";

/// One etcd member.
struct Member {
    name: String,
    /// The command line (without the program), the same at every start.
    args: Vec<String>,
    /// Its environment (`ETCD_*` variables stand for the flags of the same name).
    env: Vec<(String, String)>,
    dir: PathBuf,
    child: Option<Child>,
    /// Where `ip netns exec NETNS` runs it, if anywhere.
    netns: Option<String>,
    /// Client URL.
    endpoint: String,
}

/// A running etcd: one member or several.
pub struct Etcd {
    members: Vec<Member>,
    /// Every member's client URL, comma-separated (storaged's `--etcd` value).
    pub endpoint: String,
}

/// A free port on `ip` (bound and released; etcd takes ports only as numbers).
fn free_port(ip: &str) -> Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

impl Member {
    /// Starts the process with a new log file; does not wait.
    fn spawn(&mut self) -> Result<PathBuf> {
        let n = std::fs::read_dir(&self.dir)?.count();
        let log_path = self.dir.join(format!("{}.{n}.log", self.name));
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, ETCD]);
                c
            }
            None => Command::new(ETCD),
        };
        let child = cmd
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning etcd")?;
        self.child = Some(child);
        Ok(log_path)
    }

    /// Waits until the member started with log `log_path` serves clients.
    fn wait_ready(&mut self, log_path: &Path) -> Result<()> {
        let name = self.name.clone();
        let child = self.child.as_mut().context("not running")?;
        wait_for("etcd to serve clients", crate::storaged::DEADLINE, || {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(Err(anyhow::anyhow!(
                    "etcd member {name} exited early: {st}"
                )));
            }
            let log = std::fs::read_to_string(log_path).ok()?;
            log.contains("ready to serve client requests")
                .then_some(Ok(()))
        })?
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Etcd {
    /// Starts a one-member etcd with its data in `dir/etcd` and waits until it serves
    /// clients. Fails with the command that installs it when the binary is missing.
    pub fn start(dir: &Path) -> Result<Etcd> {
        Self::start_members(dir, 1, "127.0.0.1", None)
    }

    /// Starts an etcd cluster of `n` members listening on `ip` (inside network namespace
    /// `netns` when given), member `i` with its data in `dir/etcd-m{i}`, and waits until every
    /// member serves clients.
    pub fn start_members(dir: &Path, n: usize, ip: &str, netns: Option<&str>) -> Result<Etcd> {
        anyhow::ensure!(
            Path::new(ETCD).exists(),
            "{ETCD} is missing: run scripts/setup (it installs Debian's etcd-server)"
        );
        // Ports are picked here, where the test runs: with a namespace, its address is not
        // bound in this one, so ports of loopback stand in (the namespace is empty anyway).
        let probe = if netns.is_some() { "127.0.0.1" } else { ip };
        let mut urls = Vec::new();
        for i in 0..n {
            let (client, peer) = (free_port(probe)?, free_port(probe)?);
            urls.push((
                format!("m{i}"),
                format!("http://{ip}:{client}"),
                format!("http://{ip}:{peer}"),
            ));
        }
        let initial: Vec<String> = urls
            .iter()
            .map(|(name, _, peer)| format!("{name}={peer}"))
            .collect();
        let initial = initial.join(",");
        let mut members = Vec::new();
        for (name, client, peer) in &urls {
            let data = if n == 1 {
                dir.join("etcd")
            } else {
                dir.join(format!("etcd-{name}"))
            };
            let mdir = dir.join(format!("etcd-{name}-logs"));
            std::fs::create_dir_all(&mdir)?;
            let args: Vec<String> = [
                "--name",
                name,
                "--data-dir",
                &data.display().to_string(),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                &initial,
                "--heartbeat-interval",
                HEARTBEAT_MS,
                "--election-timeout",
                ELECTION_MS,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            members.push(Member {
                name: name.clone(),
                args,
                env: Vec::new(),
                dir: mdir,
                child: None,
                netns: netns.map(str::to_string),
                endpoint: client.clone(),
            });
        }
        let endpoint = members
            .iter()
            .map(|m| m.endpoint.clone())
            .collect::<Vec<_>>()
            .join(",");
        let mut e = Etcd { members, endpoint };
        // All start before any waits: a member of several is ready only once a quorum runs.
        let logs = e
            .members
            .iter_mut()
            .map(Member::spawn)
            .collect::<Result<Vec<_>>>()?;
        for (m, log) in e.members.iter_mut().zip(&logs) {
            m.wait_ready(log)?;
        }
        Ok(e)
    }

    /// Starts one member configured by its environment alone, as Debian's `etcd.service`
    /// runs it from `/etc/default/etcd`: `env` holds the `ETCD_*` variables, `endpoint` is
    /// its client URL among them. Logs go to `dir/etcd-env-logs`.
    pub fn start_from_env(dir: &Path, env: Vec<(String, String)>, endpoint: &str) -> Result<Etcd> {
        anyhow::ensure!(
            Path::new(ETCD).exists(),
            "{ETCD} is missing: run scripts/setup (it installs Debian's etcd-server)"
        );
        let mdir = dir.join("etcd-env-logs");
        std::fs::create_dir_all(&mdir)?;
        let mut m = Member {
            name: "env".into(),
            args: Vec::new(),
            env,
            dir: mdir,
            child: None,
            netns: None,
            endpoint: endpoint.to_string(),
        };
        let log = m.spawn()?;
        let mut e = Etcd {
            members: Vec::new(),
            endpoint: endpoint.to_string(),
        };
        // Pushed before waiting, so that a member that never gets ready is killed on drop.
        e.members.push(m);
        e.members[0].wait_ready(&log)?;
        Ok(e)
    }

    /// The number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there is no member (never: a cluster has at least one).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// SIGKILL of member `i`.
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Starts member `i` again on its data directory and ports; returns once it serves
    /// clients (which needs a quorum of members running).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        anyhow::ensure!(m.child.is_none(), "etcd member {} is running", m.name);
        let log = m.spawn()?;
        m.wait_ready(&log)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
    }
}
