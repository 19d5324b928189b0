//! A storaged inside a network namespace of a [`crate::netns::Rig`], on fixed ports of its
//! host's address, behind the cluster's token (and in TLS when given a host directory): the
//! storage host of the multi-host tests ([`crate::two_hosts`]). Killed on drop.

use crate::netns::Host;
use crate::process::{run_ok, wait_for};
use crate::storaged::DEADLINE;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

/// A storaged inside a namespace, on fixed ports of the host's address.
pub struct NsStoraged {
    child: Option<Child>,
    host: Host,
    work_dir: PathBuf,
    token_file: PathBuf,
    tls_dir: Option<PathBuf>,
    /// REST API address.
    pub api: String,
    /// NBD address.
    pub nbd: String,
    /// Log.
    pub log_path: PathBuf,
}

impl NsStoraged {
    /// Starts storaged in `host`'s namespace with its data under `work_dir`; its API requires
    /// the token in `token_file`; with `tls_dir` its NBD port requires TLS with a certificate
    /// of the cluster from every client not on loopback.
    pub fn start(
        host: &Host,
        work_dir: &Path,
        token_file: &Path,
        tls_dir: Option<&Path>,
    ) -> Result<NsStoraged> {
        let mut s = NsStoraged {
            child: None,
            host: host.clone(),
            work_dir: work_dir.to_path_buf(),
            token_file: token_file.to_path_buf(),
            tls_dir: tls_dir.map(Path::to_path_buf),
            api: format!("{}:10810", host.addr),
            nbd: format!("{}:10809", host.addr),
            log_path: work_dir.join("storaged.log"),
        };
        s.spawn(&[])?;
        Ok(s)
    }

    /// Starts storaged (again, on the same data) with extra environment variables.
    pub fn spawn(&mut self, env: &[(&str, &str)]) -> Result<()> {
        let (host, work_dir, token_file) = (&self.host, &self.work_dir, &self.token_file);
        let (api, nbd) = (&self.api, &self.nbd);
        std::fs::create_dir_all(work_dir)?;
        let ready = work_dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let n = std::fs::read_dir(work_dir)?.count();
        self.log_path = work_dir.join(format!("storaged.{n}.log"));
        let mut cmd = host.command(crate::binary("storaged"));
        cmd.arg("serve");
        if let Some(d) = &self.tls_dir {
            cmd.arg("--tls-dir").arg(d);
        }
        let mut child = cmd
            .arg("--data-dir")
            .arg(work_dir.join("data"))
            .args(["--nbd-listen", nbd, "--api-listen", api])
            .arg("--api-token-file")
            .arg(token_file)
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log_path)?)
            .spawn()
            .context("spawning storaged")?;
        wait_for("storaged ready file", DEADLINE, || {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(Err(anyhow::anyhow!("storaged exited early: {st}")));
            }
            ready.exists().then_some(Ok(()))
        })??;
        self.child = Some(child);
        Ok(())
    }

    /// storaged's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process has ended (reaping it if so).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(_))) | None => {
                self.child = None;
                true
            }
            _ => false,
        }
    }

    /// SIGKILL, and the process reaped.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `storaged ARGS... --api API` inside the namespace; returns stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        storaged_cli(&self.host, &self.api, &self.token_file, args)
    }

    /// Sends `sig` to storaged (SIGSTOP holds every answer, NBD and REST, until SIGCONT).
    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        let pid = self.child.as_ref().context("not running")?.id();
        // SAFETY: kill(2) on the pid of a child we own and have not reaped (`ip netns exec`
        // execs storaged in place, so this is storaged itself).
        if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
            bail!("kill: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The leases of a volume as (host, state) pairs, from `storaged lease list`.
    pub fn leases(&self, volume: &str) -> Result<Vec<(String, String)>> {
        let text = self.cli(&["lease", "list", volume])?;
        Ok(crate::storaged::lease_rows(&text))
    }
}

/// `storaged ARGS... --api API --token-file TOKEN` inside `host`'s namespace; returns stdout.
pub fn storaged_cli(host: &Host, api: &str, token_file: &Path, args: &[&str]) -> Result<String> {
    let out = run_ok(
        host.command(crate::binary("storaged"))
            .args(args)
            .args(["--api", api])
            .arg("--token-file")
            .arg(token_file),
    )?;
    Ok(String::from_utf8(out.stdout)?)
}

impl Drop for NsStoraged {
    fn drop(&mut self) {
        self.kill9();
    }
}
