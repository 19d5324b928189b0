//! Our VMM: the test guest under the real `vmm` binary, its serial line on a Unix socket and
//! its API on another.

use crate::agent::AgentConn;
use crate::image::GuestImage;
use anyhow::{bail, Context, Result};
use hyper::Method;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use vmhop_common::http::{Client, Target};

/// How long one API call may take (a snapshot writes the guest's memory).
const API_TIMEOUT: Duration = Duration::from_secs(150);
/// How long the VMM may take to create its sockets (it does so before the guest runs).
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

/// A disk for the guest, in order after the root disk.
#[derive(Debug, Clone)]
pub enum Disk {
    /// A raw file.
    File {
        /// Path.
        path: PathBuf,
        /// Offered read-only.
        read_only: bool,
    },
    /// A storaged volume: the value of `--disk` after `storaged=`, e.g.
    /// `127.0.0.1:10809,volume=root,host=a`.
    Storaged(String),
    /// A vhost-user-blk backend (see [`crate::vhost`]) on `socket`, using `queues` queues.
    VhostUser {
        /// The backend's socket.
        socket: PathBuf,
        /// Request queues.
        queues: u16,
    },
}

impl Disk {
    /// A vhost-user disk with one queue.
    pub fn vhost_user(socket: &Path) -> Disk {
        Disk::VhostUser {
            socket: socket.to_path_buf(),
            queues: 1,
        }
    }

    fn arg(&self) -> String {
        match self {
            Disk::File { path, read_only } => {
                format!(
                    "path={}{}",
                    path.display(),
                    if *read_only { ",ro" } else { "" }
                )
            }
            Disk::Storaged(spec) => format!("storaged={spec}"),
            Disk::VhostUser { socket, queues } => {
                format!("vhost-user={},queues={queues}", socket.display())
            }
        }
    }
}

/// What to run.
pub struct VmmConfig<'a> {
    /// Kernel and command line (the root file system is `root`).
    pub image: &'a GuestImage,
    /// The root disk (vda); `None` uses the image's root file system, read-only.
    pub root: Option<Disk>,
    /// Further disks (vdb, ...).
    pub data_disks: Vec<Disk>,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Directory for sockets and logs.
    pub work_dir: &'a Path,
}

/// A guest running under `vmm`; killed on drop.
pub struct VmmGuest {
    child: Child,
    /// The agent on the guest's serial line.
    pub agent: AgentConn,
    /// Where the serial output is logged.
    pub serial_log: PathBuf,
    /// The VMM's stderr.
    pub stderr_log: PathBuf,
    /// The API socket.
    pub api_socket: PathBuf,
    /// When the process was spawned.
    pub started: Instant,
}

/// Waits for a Unix socket to accept, while `child` lives.
fn connect(path: &Path, child: &mut Child, stderr: &Path) -> Result<UnixStream> {
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            return Ok(s);
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "vmm exited ({status}) before opening {}; stderr:\n{}",
                path.display(),
                std::fs::read_to_string(stderr).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not appear within {SOCKET_TIMEOUT:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl VmmGuest {
    /// The `vmm run` command line for `cfg`, with sockets in the work directory.
    pub fn command(cfg: &VmmConfig) -> Command {
        let mut cmd = Command::new(crate::binary("vmm"));
        cmd.arg("run")
            .arg("--kernel")
            .arg(&cfg.image.kernel)
            .args(["--cmdline", &cfg.image.cmdline])
            .args(["--memory", &cfg.mem_mib.to_string()])
            .args(["--vcpus", &cfg.vcpus.to_string()])
            .arg("--serial")
            .arg(format!(
                "unix:{}",
                cfg.work_dir.join("serial.sock").display()
            ))
            .arg("--api-socket")
            .arg(cfg.work_dir.join("api.sock"));
        let root = cfg.root.clone().unwrap_or(Disk::File {
            path: cfg.image.rootfs.clone(),
            read_only: true,
        });
        for d in std::iter::once(&root).chain(&cfg.data_disks) {
            cmd.arg("--disk").arg(d.arg());
        }
        cmd
    }

    /// Starts the VMM and connects to its serial socket.
    pub fn start(cfg: &VmmConfig) -> Result<VmmGuest> {
        Self::start_with(cfg, &[])
    }

    /// [`Self::start`] with further `vmm run` arguments (e.g. `--boot linux64`).
    pub fn start_with(cfg: &VmmConfig, extra_args: &[&str]) -> Result<VmmGuest> {
        let stderr_log = cfg.work_dir.join("vmm.stderr");
        let api_socket = cfg.work_dir.join("api.sock");
        let serial_socket = cfg.work_dir.join("serial.sock");
        let _ = std::fs::remove_file(&serial_socket);
        let _ = std::fs::remove_file(&api_socket);
        let started = Instant::now();
        let mut child = Self::command(cfg)
            .args(extra_args)
            // vCPU register dumps on pause (see `diagnose`); benchmarks set E2E_VMM_LOG=info
            // so that a pause costs what it costs in production.
            .env(
                "RUST_LOG",
                std::env::var("E2E_VMM_LOG").unwrap_or_else(|_| "info,vmm::vcpu=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_log)?)
            .spawn()
            .context("spawn vmm")?;
        let serial = match connect(&serial_socket, &mut child, &stderr_log) {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let serial_log = cfg.work_dir.join("serial.log");
        let agent = AgentConn::new(serial.try_clone()?, serial, &serial_log)?;
        Ok(VmmGuest {
            child,
            agent,
            serial_log,
            stderr_log,
            api_socket,
            started,
        })
    }

    /// One API call: returns the HTTP status and the body.
    pub fn api(&self, method: &str, path: &str) -> Result<(u16, String)> {
        api_call(&self.api_socket, method, path)
    }

    /// One API call with a JSON body.
    pub fn api_json(&self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        api_call_body(&self.api_socket, method, path, body)
    }

    /// Starts a VMM that waits for an incoming migration on `addr` (nothing boots).
    pub fn start_incoming(cfg: &VmmConfig, addr: &str) -> Result<VmmGuest> {
        let mut g = Self::start_with(cfg, &["--incoming", addr])?;
        // The VM loop answers once the VM is built, and so the stream listener bound.
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        while g.migration().is_err() {
            if let Some(status) = g.child.try_wait()? {
                bail!("vmm exited ({status}); stderr:\n{}", g.stderr());
            }
            if Instant::now() > deadline {
                bail!("the incoming VMM did not answer within {SOCKET_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(g)
    }

    /// `GET /v1/migration` as JSON.
    pub fn migration(&self) -> Result<serde_json::Value> {
        let (code, body) = self.api("GET", "/v1/migration")?;
        if code != 200 {
            bail!("GET /v1/migration: {code} {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Polls the migration status until its phase is one of `phases`; fails early on
    /// `failed`/`aborted` unless asked for, or when the VMM exits.
    pub fn wait_migration(
        &mut self,
        phases: &[&str],
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("vmm exited ({status}); stderr:\n{}", self.stderr());
            }
            let m = self.migration()?;
            let phase = m["phase"].as_str().unwrap_or_default().to_string();
            if phases.contains(&phase.as_str()) {
                return Ok(m);
            }
            if phase == "failed" || phase == "aborted" {
                bail!("migration {phase}: {m}\nstderr:\n{}", self.stderr());
            }
            if Instant::now() > deadline {
                bail!("migration still {phase} after {timeout:?}: {m}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a live migration with the send parameters `params` (JSON); fails unless the VMM
    /// accepted it (202).
    pub fn send_migration(&self, params: &str) -> Result<()> {
        let (code, body) = self.api_json("POST", "/v1/migration/send", params)?;
        if code != 202 {
            bail!("POST /v1/migration/send: {code} {body}");
        }
        Ok(())
    }

    /// Live-migrates the guest to `dst` (started with `--incoming addr`) with `resume: wait`:
    /// returns the source's status once both VMMs say the guest was handed over (the
    /// destination then waits for [`Self::resume_incoming`], typically after a lease flip).
    pub fn hand_over(
        &mut self,
        dst: &mut VmmGuest,
        addr: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        self.send_migration(&format!(
            r#"{{"destination":"{addr}","downtime_limit_ms":300,"resume":"wait"}}"#
        ))?;
        let handed = self.wait_migration(&["handed-over"], timeout)?;
        dst.wait_migration(&["handed-over"], timeout)?;
        Ok(handed)
    }

    /// Runs a handed-over guest on this destination: returns its final migration status.
    pub fn resume_incoming(&mut self, timeout: Duration) -> Result<serde_json::Value> {
        let (code, body) = self.api("POST", "/v1/vm/resume")?;
        if code != 200 {
            bail!("POST /v1/vm/resume: {code} {body}");
        }
        self.wait_migration(&["completed"], timeout)
    }

    /// Ends the VMM through the API and waits for its clean exit.
    pub fn shutdown(&mut self) -> Result<()> {
        let (code, body) = self.api("POST", "/v1/vm/shutdown")?;
        if code != 200 {
            bail!("POST /v1/vm/shutdown: {code} {body}");
        }
        let status = self.wait_exit(Duration::from_secs(30))?;
        if !status.success() {
            bail!("vmm exited with {status}; stderr:\n{}", self.stderr());
        }
        Ok(())
    }

    /// The VMM's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Waits for the VMM to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "vmm still running after {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What to look at when the guest stops answering: pauses the VM (the VMM then logs every
    /// vCPU's registers and the code at RIP), resumes it, and returns the VMM's stderr and the
    /// console tail.
    pub fn diagnose(&self) -> String {
        let pause = self.api("POST", "/v1/vm/pause");
        let _ = self.api("POST", "/v1/vm/resume");
        format!(
            "pause: {pause:?}\nvmm stderr:\n{}\nconsole:\n{}",
            self.stderr(),
            self.agent.console_tail()
        )
    }

    /// Unwraps `r`, or panics with [`Self::diagnose`].
    pub fn ok<T>(&self, r: Result<T>) -> T {
        match r {
            Ok(v) => v,
            Err(e) => panic!("{e:#}\n{}", self.diagnose()),
        }
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for VmmGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One API call over the VMM's socket, through the project's HTTP client: the HTTP status and
/// the body. Callable from any thread, inside a tokio runtime or not.
pub fn api_call(socket: &Path, method: &str, path: &str) -> Result<(u16, String)> {
    api_call_body(socket, method, path, "")
}

/// [`api_call`] with a JSON body (none when empty).
pub fn api_call_body(socket: &Path, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    let client = Client::new(Target::Unix(socket.to_path_buf()), API_TIMEOUT);
    let method = Method::from_bytes(method.as_bytes())?;
    let body = (!body.is_empty()).then(|| body.as_bytes().to_vec());
    let (status, bytes) = crate::block_on(client.raw(method, path, body))
        .with_context(|| format!("{} {path}", socket.display()))?;
    Ok((
        status.as_u16(),
        String::from_utf8_lossy(&bytes).into_owned(),
    ))
}

/// The value of a top-level string field in a JSON body (enough for `state`).
pub fn json_str(body: &str, key: &str) -> Option<String> {
    let at = body.find(&format!("\"{key}\":\""))? + key.len() + 4;
    Some(body[at..].split('"').next()?.to_string())
}
