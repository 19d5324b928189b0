//! A real `migrated` per test host (optionally inside a network namespace of a
//! [`crate::netns::Rig`]), driven through `migratectl --json`, and the guest descriptions it
//! runs. Everything is killed on drop, including the VMMs the agents started (found through
//! their `vmm.pid` files). The multi-host rigs are in [`crate::two_hosts`].

use crate::netns::Host;
use crate::process::{run_ok, wait_for};
use crate::storaged::DEADLINE;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// How a migrated is started.
#[derive(Debug, Clone)]
pub struct MigratedOptions {
    /// Host id.
    pub host_id: String,
    /// REST listen address (`127.0.0.1:0` on loopback).
    pub listen: String,
    /// storaged REST API.
    pub storaged_api: String,
    /// storaged NBD.
    pub storaged_nbd: String,
    /// Peers: id and REST address.
    pub peers: Vec<(String, String)>,
    /// Run inside this namespace.
    pub netns: Option<Host>,
    /// Peer loss timeout.
    pub peer_timeout_ms: u64,
    /// The cluster's token file (`--token-file`).
    pub token_file: Option<PathBuf>,
    /// storaged's API token file (`--storaged-token-file`).
    pub storaged_token_file: Option<PathBuf>,
    /// Extra environment (a fault point of the fault matrix, see [`crate::faults`]).
    pub env: Vec<(String, String)>,
    /// The host's TLS directory (`--tls-dir`): TLS to storaged, between VMMs and agents.
    pub tls_dir: Option<PathBuf>,
    /// The host id in storaged's certificate (`--storaged-name`).
    pub storaged_name: Option<String>,
    /// Log JSON lines (`--log-json`; the VMMs it starts too).
    pub log_json: bool,
}

impl MigratedOptions {
    /// On loopback with no storaged: its addresses are the discard port, where nothing
    /// answers (for the tests that boot no guest).
    pub fn without_storaged(host_id: &str) -> MigratedOptions {
        MigratedOptions::local(host_id, "127.0.0.1:9", "127.0.0.1:9")
    }

    /// On loopback, with storaged at the given addresses.
    pub fn local(host_id: &str, storaged_api: &str, storaged_nbd: &str) -> MigratedOptions {
        MigratedOptions {
            host_id: host_id.into(),
            listen: "127.0.0.1:0".into(),
            storaged_api: storaged_api.into(),
            storaged_nbd: storaged_nbd.into(),
            peers: Vec::new(),
            netns: None,
            peer_timeout_ms: 5000,
            token_file: None,
            storaged_token_file: None,
            env: Vec::new(),
            tls_dir: None,
            storaged_name: None,
            log_json: false,
        }
    }
}

/// A running migrated.
pub struct Migrated {
    child: Option<Child>,
    /// How it is started (a change applies at the next start).
    pub opts: MigratedOptions,
    /// Work directory (state, socket, logs).
    pub work_dir: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Unix socket.
    pub socket: PathBuf,
    /// Bound REST address.
    pub listen: String,
    /// stderr of the current run.
    pub log_path: PathBuf,
}

impl Migrated {
    /// Starts migrated as host `host` on loopback with the storaged `s` and `peers` (id,
    /// address), its state under `dir/host`, with the options `tune` sets.
    pub fn on_loopback(
        dir: &Path,
        host: &str,
        s: &crate::storaged::Storaged,
        peers: &[(&str, &str)],
        tune: impl FnOnce(&mut MigratedOptions),
    ) -> Result<Migrated> {
        let mut o = MigratedOptions::local(host, &s.api.to_string(), &s.nbd.to_string());
        o.peers = peers
            .iter()
            .map(|(h, a)| (h.to_string(), a.to_string()))
            .collect();
        tune(&mut o);
        Migrated::start(&dir.join(host), o)
    }

    /// Starts migrated with its state under `work_dir`.
    pub fn start(work_dir: &Path, opts: MigratedOptions) -> Result<Migrated> {
        std::fs::create_dir_all(work_dir)?;
        let mut m = Migrated {
            child: None,
            opts,
            work_dir: work_dir.to_path_buf(),
            state_dir: work_dir.join("state"),
            socket: work_dir.join("migrated.sock"),
            listen: String::new(),
            log_path: PathBuf::new(),
        };
        m.spawn()?;
        Ok(m)
    }

    /// The command line (without the namespace wrapper).
    fn spawn(&mut self) -> Result<()> {
        let ready = self.work_dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let n = std::fs::read_dir(&self.work_dir)?.count();
        self.log_path = self.work_dir.join(format!("migrated.{n}.log"));
        let bin = crate::binary("migrated");
        let mut cmd = match &self.opts.netns {
            Some(h) => h.command(&bin),
            None => Command::new(&bin),
        };
        cmd.args(["--host-id", &self.opts.host_id])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--listen", &self.opts.listen])
            .arg("--socket")
            .arg(&self.socket)
            .args(["--storaged-api", &self.opts.storaged_api])
            .args(["--storaged-nbd", &self.opts.storaged_nbd])
            .arg("--vmm-binary")
            .arg(crate::binary("vmm"))
            .args(["--peer-timeout-ms", &self.opts.peer_timeout_ms.to_string()])
            .arg("--ready-file")
            .arg(&ready);
        for (id, addr) in &self.opts.peers {
            cmd.arg("--peer").arg(format!("{id}={addr}"));
        }
        if let Some(t) = &self.opts.token_file {
            cmd.arg("--token-file").arg(t);
        }
        if let Some(t) = &self.opts.storaged_token_file {
            cmd.arg("--storaged-token-file").arg(t);
        }
        if let Some(d) = &self.opts.tls_dir {
            cmd.arg("--tls-dir").arg(d);
        }
        if let Some(n) = &self.opts.storaged_name {
            cmd.args(["--storaged-name", n]);
        }
        if self.opts.log_json {
            cmd.arg("--log-json");
        }
        let log = std::fs::File::create(&self.log_path)?;
        let mut child = cmd
            .env("RUST_LOG", "info")
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning migrated")?;
        let json: Value = wait_for("migrated ready file", DEADLINE, || {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(Err(anyhow::anyhow!(
                    "migrated exited early ({st}):\n{}",
                    std::fs::read_to_string(&self.log_path).unwrap_or_default()
                )));
            }
            let text = std::fs::read_to_string(&ready).ok()?;
            serde_json::from_str(&text).ok().map(Ok)
        })??;
        self.listen = json["listen"].as_str().context("listen")?.to_string();
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, then a new run on the same state.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }

    /// Starts again after [`Migrated::kill9`] or [`Migrated::terminate`].
    pub fn start_again(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("migrated is still running");
        }
        self.spawn()
    }

    /// SIGKILL, no cleanup (the VMMs it started keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; returns the exit status.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("not running")?;
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        if unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) } != 0 {
            bail!("kill: {}", std::io::Error::last_os_error());
        }
        wait_for("migrated to exit", DEADLINE, || c.try_wait().ok().flatten())
    }

    /// Whether the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The log of the current run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `migratectl --socket SOCKET ARGS...`, whatever its exit status.
    pub fn ctl_raw(&self, args: &[&str]) -> Result<Output> {
        Command::new(crate::binary("migratectl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running migratectl")
    }

    /// `migratectl --json ARGS...`; fails unless it succeeds; returns the JSON.
    pub fn ctl(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = run_ok(
            Command::new(crate::binary("migratectl"))
                .arg("--socket")
                .arg(&self.socket)
                .args(&all),
        )?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "migratectl output: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// One instance's record.
    pub fn instance(&self, name: &str) -> Result<Value> {
        self.ctl(&["show", name])
    }

    /// Waits until instance `name` is in `state`.
    pub fn wait_state(&self, name: &str, state: &str, limit: Duration) -> Result<Value> {
        wait_for(&format!("{name} to be {state}"), limit, || {
            self.instance(name)
                .ok()
                .filter(|v| v["state"].as_str() == Some(state))
        })
    }

    /// The pids in the `vmm.pid` files of this agent's instances that are live VMMs.
    pub fn vmm_pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        let Ok(dirs) = std::fs::read_dir(self.state_dir.join("instances")) else {
            return out;
        };
        for d in dirs.flatten() {
            let Ok(text) = std::fs::read_to_string(d.path().join("vmm.pid")) else {
                continue;
            };
            if let Ok(pid) = text.trim().parse::<u32>() {
                if is_vmm(pid) {
                    out.push(pid);
                }
            }
        }
        out
    }

    /// The live vhost-user disk backends this agent started (their command lines name its
    /// state directory).
    pub fn backend_pids(&self) -> Vec<u32> {
        processes_with("vhost-user-blk", &self.state_dir.display().to_string())
    }
}

/// `migratectl ARGS` with stdin closed: its exit code, stdout and stderr.
pub fn migratectl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(crate::binary("migratectl"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running migratectl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether `pid` is a live (non-zombie) process of the project's `vmm` binary.
pub fn is_vmm(pid: u32) -> bool {
    is_process_of(pid, "vmm")
}

/// Whether `pid` is a live (non-zombie) process of the binary `name`.
pub fn is_process_of(pid: u32, name: &str) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(')')
        .map(|(_, r)| r.trim_start().starts_with('Z'))
        .unwrap_or(true);
    !zombie && !process_gone(pid) && exe.is_some_and(|e| e.file_name().is_some_and(|n| n == name))
}

/// Whether `pid` has ended: gone, a zombie, or tearing down (task flag PF_EXITING).
pub fn process_gone(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return true;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let flags: u64 = f.get(6).and_then(|x| x.parse().ok()).unwrap_or(0);
    matches!(f.first(), Some(&"Z") | Some(&"X") | None) || flags & 0x4 != 0
}

/// Every live `vmm` process whose command line mentions `needle`.
pub fn vmm_processes_with(needle: &str) -> Vec<u32> {
    processes_with("vmm", needle)
}

/// Every live process of the binary `name` whose command line mentions `needle`.
pub fn processes_with(name: &str, needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if is_process_of(pid, name) && String::from_utf8_lossy(&cmdline).contains(needle) {
            out.push(pid);
        }
    }
    out
}

impl Drop for Migrated {
    fn drop(&mut self) {
        self.kill9();
        for pid in self.vmm_pids().into_iter().chain(self.backend_pids()) {
            // SAFETY: kill(2) on a pid just checked to be one of our VMM or backend processes.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

/// Writes a guest description for `migratectl run`.
pub fn write_guest_toml(
    path: &Path,
    name: &str,
    image: &crate::image::GuestImage,
    memory_mib: u32,
    data_volumes: &[&str],
) -> Result<()> {
    write_toml(path, name, image, memory_mib, None, data_volumes, None)
}

/// Writes a guest description for `migratectl run` that starts from the suite's booted guest
/// (see [`crate::snapshot`]) with one fresh data volume; its boot id is `booted.boot_id`.
pub fn write_restored_guest_toml(
    path: &Path,
    name: &str,
    image: &crate::image::GuestImage,
    booted: &crate::snapshot::Booted,
    data_volume: &str,
) -> Result<()> {
    write_restored_guest_toml_with_root(path, name, image, booted, None, data_volume)
}

/// [`write_restored_guest_toml`], with the root file system on storaged volume `root_volume`
/// when given (read-only; a copy of the image's root file system, of its size) instead of the
/// image file.
pub fn write_restored_guest_toml_with_root(
    path: &Path,
    name: &str,
    image: &crate::image::GuestImage,
    booted: &crate::snapshot::Booted,
    root_volume: Option<&str>,
    data_volume: &str,
) -> Result<()> {
    write_toml(
        path,
        name,
        image,
        crate::snapshot::MEM_MIB,
        root_volume,
        &[data_volume],
        Some(&booted.path),
    )
}

fn write_toml(
    path: &Path,
    name: &str,
    image: &crate::image::GuestImage,
    memory_mib: u32,
    root_volume: Option<&str>,
    data_volumes: &[&str],
    restore: Option<&Path>,
) -> Result<()> {
    let mut t = format!(
        "name = {:?}\nkernel = {:?}\ncmdline = {:?}\nmemory_mib = {memory_mib}\nvcpus = 1\n",
        name,
        image.kernel.display().to_string(),
        image.cmdline
    );
    if let Some(r) = restore {
        t.push_str(&format!("restore = {:?}\n", r.display().to_string()));
    }
    t.push_str(&match root_volume {
        Some(v) => format!("[[disks]]\nvolume = {v:?}\nread_only = true\n"),
        None => format!(
            "[[disks]]\npath = {:?}\nread_only = true\n",
            image.rootfs.display().to_string()
        ),
    });
    for v in data_volumes {
        t.push_str(&format!("[[disks]]\nvolume = {v:?}\n"));
    }
    std::fs::write(path, t)?;
    Ok(())
}

/// Connects to an instance's serial socket and returns the agent connection.
pub fn agent_of(instance: &Value, log: &Path) -> Result<crate::agent::AgentConn> {
    let path = instance["serial_socket"]
        .as_str()
        .context("serial_socket")?
        .to_string();
    let s = std::os::unix::net::UnixStream::connect(&path)
        .with_context(|| format!("connect {path}"))?;
    crate::agent::AgentConn::new(s.try_clone()?, s, log)
}

/// `migratectl --socket SOCKET --json migrate ARGS...` started in the background: the
/// migration's final record comes from [`Migration::wait`].
pub struct Migration {
    child: Child,
}

impl Migration {
    /// Starts `migratectl --json migrate ARGS` against `agent`.
    pub fn start(agent: &Migrated, args: &[&str]) -> Result<Migration> {
        let child = Command::new(crate::binary("migratectl"))
            .arg("--socket")
            .arg(&agent.socket)
            .arg("--json")
            .arg("migrate")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running migratectl")?;
        Ok(Migration { child })
    }

    /// Waits for migratectl: its exit status and the record it printed (`Value::Null` when
    /// it printed none, e.g. because its migrated was killed).
    pub fn wait(self) -> Result<(bool, Value, String)> {
        let out = self.child.wait_with_output()?;
        let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        Ok((
            out.status.success(),
            v,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

impl Migrated {
    /// The migrations this agent knows, newest last.
    pub fn migrations(&self) -> Result<Vec<Value>> {
        let v = self.ctl(&["migrations"])?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Waits until the newest migration of instance `name` here is in `phase`; returns it.
    pub fn wait_migration_phase(&self, name: &str, phase: &str, limit: Duration) -> Result<Value> {
        wait_for(
            &format!("a migration of {name} in phase {phase}"),
            limit,
            || {
                self.migrations()
                    .ok()?
                    .into_iter()
                    .filter(|m| m["instance"] == name)
                    .max_by_key(|m| m["started_ms"].as_u64())
                    .filter(|m| m["phase"] == phase)
            },
        )
    }
}

/// Host `name`'s agent of the two hosts' agents `a` and `b`.
pub fn agent_named<'a>(a: &'a Migrated, b: &'a Migrated, name: &str) -> &'a Migrated {
    match name {
        "a" => a,
        "b" => b,
        _ => panic!("no host {name}"),
    }
}
