//! A real `storaged` process for the end-to-end tests: started on ephemeral 127.0.0.1 ports
//! (read back from its `--ready-file`), driven through its CLI, REST API and NBD port, and
//! killed on drop.

use crate::process::{run_ok, terminate, wait_for};
use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// Generous: the machine is shared with guest boots and builds.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The holders' rows of `storaged lease list`'s table, as (host, state) pairs (the header
/// lines and the anonymous-access line left out).
pub fn lease_rows(text: &str) -> Vec<(String, String)> {
    text.lines()
        .skip(2)
        .filter(|l| !l.starts_with("anonymous"))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4).then(|| (f[0].to_string(), f[2].to_string()))
        })
        .collect()
}

/// A running storaged.
pub struct Storaged {
    child: Option<Child>,
    /// Data directory (kept across restarts).
    pub data_dir: PathBuf,
    /// Work directory (ready file, log).
    pub work_dir: PathBuf,
    /// Bound NBD address.
    pub nbd: SocketAddr,
    /// Bound API address.
    pub api: SocketAddr,
    /// stderr log of this run.
    pub log_path: PathBuf,
    /// The network namespace it runs in (`ip netns exec`), if not this process's.
    netns: Option<String>,
}

impl Storaged {
    /// Starts storaged with its data in `work_dir/data`.
    pub fn start(work_dir: &Path) -> Result<Storaged> {
        Self::start_with(work_dir, &[])
    }

    /// Starts storaged with extra `serve` flags.
    pub fn start_with(work_dir: &Path, extra: &[&str]) -> Result<Storaged> {
        Self::start_with_env(work_dir, extra, &[])
    }

    /// Starts storaged with the TLS directory `tls_dir`, TLS required from loopback clients
    /// too (`--no-plaintext-loopback`), as on a production host.
    pub fn start_tls_only(work_dir: &Path, tls_dir: &Path) -> Result<Storaged> {
        let tls_dir = tls_dir.to_str().context("TLS directory path")?;
        Self::start_with(work_dir, &["--tls-dir", tls_dir, "--no-plaintext-loopback"])
    }

    /// Starts storaged with extra `serve` flags and environment variables.
    pub fn start_with_env(
        work_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Storaged> {
        let any = "127.0.0.1:0".parse()?;
        Self::spawn(work_dir, None, (any, any), extra, env)
    }

    /// Starts storaged inside network namespace `netns`, listening on `ip` (NBD and API on
    /// ports it picks), with extra `serve` flags and environment variables.
    pub fn start_in(
        work_dir: &Path,
        netns: &str,
        ip: std::net::IpAddr,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Storaged> {
        let any = SocketAddr::new(ip, 0);
        Self::spawn(work_dir, Some(netns), (any, any), extra, env)
    }

    /// Starts storaged listening on `listen` (NBD, API).
    fn spawn(
        work_dir: &Path,
        netns: Option<&str>,
        listen: (SocketAddr, SocketAddr),
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Storaged> {
        let data_dir = work_dir.join("data");
        let ready = work_dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let n = std::fs::read_dir(work_dir)?.count();
        let log_path = work_dir.join(format!("storaged.{n}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = match netns {
            // `ip netns exec` execs the program: the child's pid is storaged's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(crate::binary("storaged"));
                c
            }
            None => Command::new(crate::binary("storaged")),
        };
        let child = cmd
            .arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--nbd-listen")
            .arg(listen.0.to_string())
            .arg("--api-listen")
            .arg(listen.1.to_string())
            .arg("--ready-file")
            .arg(&ready)
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning storaged")?;
        let mut s = Storaged {
            child: Some(child),
            data_dir,
            work_dir: work_dir.to_path_buf(),
            nbd: "127.0.0.1:0".parse()?,
            api: "127.0.0.1:0".parse()?,
            log_path,
            netns: netns.map(str::to_string),
        };
        let child = s.child.as_mut().expect("child");
        let json: serde_json::Value = wait_for("storaged ready file", DEADLINE, || {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(Err(anyhow::anyhow!("storaged exited early: {st}")));
            }
            let text = std::fs::read_to_string(&ready).ok()?;
            serde_json::from_str(&text).ok().map(Ok)
        })??;
        s.nbd = json["nbd"].as_str().context("nbd")?.parse()?;
        s.api = json["api"].as_str().context("api")?.parse()?;
        Ok(s)
    }

    /// Starts storaged in `work_dir` (created) with an empty volume `data_volume` the size of the
    /// suite snapshot's data disk ([`crate::snapshot::DATA_DISK_BYTES`]).
    pub fn start_with_data_volume(work_dir: &Path, data_volume: &str) -> Result<Storaged> {
        std::fs::create_dir_all(work_dir)?;
        let s = Self::start(work_dir)?;
        let size = crate::snapshot::DATA_DISK_BYTES.to_string();
        s.create_volume(data_volume, &size, &[])?;
        Ok(s)
    }

    /// Starts storaged in a new temp dir with one volume created with `flags` (`volume create`'s);
    /// the dir lives as long as the returned handle to it.
    pub fn start_with_volume(
        name: &str,
        size: &str,
        flags: &[&str],
    ) -> Result<(tempfile::TempDir, Storaged)> {
        let dir = tempfile::tempdir()?;
        let s = Self::start(dir.path())?;
        s.create_volume(name, size, flags)?;
        Ok((dir, s))
    }

    /// Creates volume `name` with the content of the raw image `image` (the test guest's root
    /// file system), filled anonymously with qemu-img before any primary exists, then used
    /// leased.
    pub fn create_volume_from(&self, name: &str, image: &Path) -> Result<()> {
        let size = std::fs::metadata(image)?.len().to_string();
        self.create_volume(name, &size, &["--anonymous", "read-write-without-primary"])?;
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-n", "-f", "raw", "-O", "raw"])
                .arg(image)
                .arg(self.uri(name)),
        )?;
        Ok(())
    }

    /// Starts again on the same data dir (new ports).
    pub fn restart(&mut self, extra: &[&str]) -> Result<()> {
        self.kill9();
        let fresh = Storaged::start_with(&self.work_dir, extra)?;
        *self = fresh;
        Ok(())
    }

    /// Starts again, after [`Self::terminate`] or [`Self::kill9`], on the same data dir and
    /// the same ports: as a service manager restarts it, clients find it where it was.
    pub fn start_again(&mut self) -> Result<()> {
        let fresh = Storaged::spawn(
            &self.work_dir,
            self.netns.as_deref(),
            (self.nbd, self.api),
            &[],
            &[],
        )?;
        *self = fresh;
        Ok(())
    }

    /// [`Self::start_again`] with `serve` flags (a cluster node's).
    pub fn start_again_with(&mut self, extra: &[&str]) -> Result<()> {
        let fresh = Storaged::spawn(
            &self.work_dir,
            self.netns.as_deref(),
            (self.nbd, self.api),
            extra,
            &[],
        )?;
        *self = fresh;
        Ok(())
    }

    /// Whether the process is stopped (SIGSTOP, or a fault point's stall).
    pub fn is_stopped(&self) -> bool {
        let Some(c) = self.child.as_ref() else {
            return false;
        };
        std::fs::read_to_string(format!("/proc/{}/stat", c.id()))
            .ok()
            .and_then(|s| {
                let after = s.rsplit_once(')')?.1.trim_start();
                after.chars().next()
            })
            .is_some_and(|st| st == 'T')
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) the process: a storaged that hangs, with its
    /// connections open.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        let child = self.child.as_ref().context("not running")?;
        let sig = if frozen {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        kill(Pid::from_raw(child.id() as i32), sig)?;
        Ok(())
    }

    /// Whether a client sent storaged bytes it has not read: a request waiting in one of its
    /// NBD connections (what a frozen storaged leaves in flight).
    pub fn unread_requests(&self) -> Result<bool> {
        let port = format!(":{:04X}", self.nbd.port());
        let tcp = std::fs::read_to_string("/proc/net/tcp")?;
        Ok(tcp.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // local address, state 01 (established), tx_queue:rx_queue
            f.len() > 4
                && f[1].ends_with(&port)
                && f[3] == "01"
                && f[4]
                    .split_once(':')
                    .is_some_and(|(_, rx)| u64::from_str_radix(rx, 16).is_ok_and(|n| n > 0))
        }))
    }

    /// A VM disk on `volume` that asks for a `lease` (primary or standby) for `host`.
    pub fn lease_disk(&self, volume: &str, host: &str, lease: &str) -> crate::vmm::Disk {
        crate::vmm::Disk::Storaged(format!(
            "{},volume={volume},host={host},lease={lease}",
            self.nbd
        ))
    }

    /// `nbd://` URI of a volume.
    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.nbd)
    }

    /// The state `host` holds on `volume` (as `storaged lease list` shows it), if any.
    pub fn lease_state(&self, volume: &str, host: &str) -> Option<String> {
        let text = self.cli(&["lease", "list", volume]).ok()?;
        lease_rows(&text)
            .into_iter()
            .find_map(|(h, state)| (h == host).then_some(state))
    }

    /// Runs a `storaged` CLI subcommand against this server; returns stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = run_ok(
            Command::new(crate::binary("storaged"))
                .args(args)
                .arg("--api")
                .arg(self.api.to_string()),
        )?;
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `storaged lease rollback VOLUME --epoch EPOCH --primary HOST`: undoes the flip that made
    /// HOST primary at EPOCH; returns the report printed.
    pub fn rollback(&self, volume: &str, epoch: u64, primary: &str) -> Result<String> {
        let epoch = epoch.to_string();
        let args = [
            "lease",
            "rollback",
            volume,
            "--epoch",
            &epoch,
            "--primary",
            primary,
        ];
        self.cli(&args)
    }

    /// Creates a volume through the CLI.
    pub fn create_volume(&self, name: &str, size: &str, extra: &[&str]) -> Result<()> {
        let mut args = vec!["volume", "create", name, "--size", size];
        args.extend_from_slice(extra);
        self.cli(&args)?;
        Ok(())
    }

    /// The file behind a volume.
    pub fn volume_file(&self, name: &str) -> PathBuf {
        self.data_dir.join("volumes").join(format!("{name}.img"))
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGKILL, no cleanup.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        let mut c = self.child.take().context("not running")?;
        terminate(&mut c, "storaged", DEADLINE)
    }

    /// The process id.
    pub fn pid(&self) -> Result<u32> {
        Ok(self.child.as_ref().context("not running")?.id())
    }

    /// A line of `/proc/PID/status` (e.g. `VmRSS`) in KiB.
    pub fn status_kib(&self, field: &str) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?))?;
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .with_context(|| format!("no {field} in /proc/PID/status"))?;
        Ok(line.trim().trim_end_matches("kB").trim().parse()?)
    }

    /// Bytes the process has read with read system calls so far (`rchar` of /proc/PID/io):
    /// volume data and requests.
    pub fn read_bytes(&self) -> Result<u64> {
        let io = std::fs::read_to_string(format!("/proc/{}/io", self.pid()?))?;
        let line = io
            .lines()
            .find_map(|l| l.strip_prefix("rchar:"))
            .context("no rchar in /proc/PID/io")?;
        Ok(line.trim().parse()?)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Storaged {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A lease-aware client configuration for `volume` on `s`.
pub fn client_config(
    s: &Storaged,
    volume: &str,
    host: &str,
    state: storaged_client::protocol::RequestedState,
) -> storaged_client::nbd::ClientConfig {
    storaged_client::nbd::ClientConfig::new(vec![s.nbd.to_string()], volume).with_lease(
        storaged_client::nbd::LeaseSpec {
            host: host.into(),
            instance: format!("{host}-vm"),
            state,
            expected_epoch: 0,
        },
    )
}
