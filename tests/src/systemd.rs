//! Hosts with a real systemd: Debian containers booted with `systemd-nspawn`, one per test host,
//! each joined to that host's network namespace ([`crate::netns`]), into which a test installs
//! the project's Debian packages and runs the daemons as units.
//!
//! The root file system comes from `scripts/systemd-root` (debootstrap of Debian 12 with systemd,
//! made once and cached by its inputs); each container boots an overlay of it (the cached root
//! read-only below, the container's own changes in a directory of the test above), so that
//! nothing is copied or deleted file by file:
//! `systemd-nspawn --keep-unit --register=no -D OVERLAY -b --network-namespace-path=NETNS`. The two
//! flags keep nspawn away from the host's system bus and machined, which hosts without systemd
//! as their init do not have. A test reaches a container with `nsenter` into all namespaces of
//! the container's init (its leader pid, found as nspawn's child that is pid 1 of its own pid
//! namespace): `systemctl`, `journalctl`, `dpkg` and the project's commands then run exactly as
//! an operator's shell on that host would run them.

use crate::process::{run_ok, wait_for};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// The `PATH` of commands run in a container.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long a container may take to boot to `running` (or `degraded`).
pub const BOOT: Duration = Duration::from_secs(120);
/// How long a container may take to shut down after nspawn's SIGTERM.
const SHUTDOWN: Duration = Duration::from_secs(60);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .into()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The cached Debian root (made on first use, about a minute from Debian's mirror). Fails
/// with the commands that make what is missing.
pub fn root() -> Result<PathBuf> {
    for tool in ["debootstrap", "systemd-nspawn", "nsenter"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            bail!("{tool} is missing: run scripts/setup (it installs debootstrap and systemd-container)");
        }
    }
    let out = run_ok(Command::new(workspace().join("scripts/systemd-root")).arg("--quiet"))
        .context("making the Debian root: run scripts/systemd-root to see why")?;
    let path = PathBuf::from(stdout(&out).lines().last().unwrap_or_default());
    if !path.join(".complete").exists() {
        bail!("scripts/systemd-root printed {path:?}, which is no complete root");
    }
    Ok(path)
}

/// Builds the project's Debian packages from the suite's own build (`scripts/package
/// --no-build --profile dev`) into `out`; returns the paths of vmhop-storaged and
/// vmhop-migrated.
pub fn packages(out: &Path) -> Result<(PathBuf, PathBuf)> {
    run_ok(
        Command::new(workspace().join("scripts/package"))
            .args(["--no-build", "--profile", "dev", "--out"])
            .arg(out),
    )
    .context("scripts/package --no-build --profile dev (cargo-deb: run scripts/setup)")?;
    let deb = |p: &str| out.join(format!("{p}_{}-1_amd64.deb", env!("CARGO_PKG_VERSION")));
    Ok((deb("vmhop-storaged"), deb("vmhop-migrated")))
}

/// What a container sees of the host: a path bound at the same place (or at `at`), read-only
/// or not.
#[derive(Debug, Clone)]
pub struct Bind {
    /// The host path (and the path inside, without `at`).
    pub path: PathBuf,
    /// Where the container sees it, when not at the same place.
    pub at: Option<PathBuf>,
    /// Read-only.
    pub read_only: bool,
}

impl Bind {
    /// `path` read-only.
    pub fn ro(path: impl Into<PathBuf>) -> Bind {
        Bind {
            path: path.into(),
            at: None,
            read_only: true,
        }
    }
    /// `path` read-only, seen at `at` in the container.
    pub fn ro_at(path: impl Into<PathBuf>, at: impl Into<PathBuf>) -> Bind {
        Bind {
            at: Some(at.into()),
            ..Bind::ro(path)
        }
    }
    /// `path` read-write (a device such as /dev/kvm).
    pub fn rw(path: impl Into<PathBuf>) -> Bind {
        Bind {
            read_only: false,
            ..Bind::ro(path)
        }
    }

    /// The path in the container.
    pub fn inside(&self) -> &Path {
        self.at.as_deref().unwrap_or(&self.path)
    }
}

/// An overlay mount of the cached root at `dir`, with the writable layer beside it; unmounted
/// and removed on drop.
struct Overlay {
    dir: PathBuf,
    upper: PathBuf,
    work: PathBuf,
}

impl Overlay {
    /// Mounts `root` read-only under a new writable layer at `dir`.
    fn mount(root: &Path, dir: &Path) -> Result<Overlay> {
        let o = Overlay {
            dir: dir.into(),
            upper: dir.with_extension("upper"),
            work: dir.with_extension("work"),
        };
        for d in [&o.dir, &o.upper, &o.work] {
            std::fs::create_dir_all(d)?;
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            root.display(),
            o.upper.display(),
            o.work.display()
        );
        run_ok(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &options])
                .arg(&o.dir),
        )
        .context("mounting an overlay of the Debian root")?;
        Ok(o)
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status();
        for d in [&self.dir, &self.upper, &self.work] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A booted container; shut down (and its overlay of the root removed) on drop.
pub struct Container {
    /// Its name (also its hostname).
    pub name: String,
    /// Its root directory on the host.
    pub dir: PathBuf,
    nspawn: Child,
    leader: u32,
    console: PathBuf,
    /// Its root; dropped (unmounted) after the container stopped.
    _root: Overlay,
    /// nspawn was told to shut the container down.
    stopping: bool,
}

/// The pid of `parent`'s child that is pid 1 of its own pid namespace (nspawn's container init).
fn init_child_of(parent: u32) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        };
        let ppid = field("PPid:");
        let nspid = field("NSpid:").unwrap_or_default();
        if ppid.as_deref() == Some(&parent.to_string()) && nspid.ends_with(" 1") {
            return Some(pid);
        }
    }
    None
}

impl Container {
    /// Mounts an overlay of `root` at `work/NAME` and boots it in the network namespace `netns` (a name under /run/netns) with `binds`.
    /// Returns once its init runs; see [`Container::wait_running`].
    pub fn boot(
        name: &str,
        root: &Path,
        work: &Path,
        netns: &str,
        binds: &[Bind],
    ) -> Result<Container> {
        let dir = work.join(name);
        let overlay = Overlay::mount(root, &dir)?;
        std::fs::write(dir.join("etc/hostname"), format!("{name}\n"))?;
        let console = work.join(format!("{name}-console.log"));
        let log = std::fs::File::create(&console)?;
        let mut cmd = Command::new("systemd-nspawn");
        // The container's systemd runs on the unified cgroup hierarchy (cgroup v2), as on a
        // Debian 12 host, also where this machine mounts the legacy one: only there does it
        // learn at once that a scope's last process exited (a legacy hierarchy tells
        // nobody inside a container), so a guest's scope ends with its VMM.
        cmd.env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .args(["--keep-unit", "--register=no", "--quiet", "-b"])
            .arg(format!("--machine={name}"))
            .arg("-D")
            .arg(&dir)
            .arg(format!("--network-namespace-path=/run/netns/{netns}"));
        for b in binds {
            let flag = if b.read_only { "--bind-ro" } else { "--bind" };
            cmd.arg(format!(
                "{flag}={}:{}",
                b.path.display(),
                b.inside().display()
            ));
        }
        let nspawn = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting systemd-nspawn (systemd-container: run scripts/setup)")?;
        let mut c = Container {
            name: name.to_string(),
            dir,
            nspawn,
            leader: 0,
            console,
            _root: overlay,
            stopping: false,
        };
        let parent = c.nspawn.id();
        let nspawn = &mut c.nspawn;
        let leader = wait_for(
            &format!("the init of container {name}"),
            Duration::from_secs(30),
            || {
                if let Ok(Some(_)) = nspawn.try_wait() {
                    return Some(None);
                }
                init_child_of(parent).map(Some)
            },
        )?;
        match leader {
            Some(pid) => c.leader = pid,
            None => bail!(
                "systemd-nspawn of {name} exited:\n{}",
                std::fs::read_to_string(&c.console).unwrap_or_default()
            ),
        }
        Ok(c)
    }

    /// The container's init as the host sees it.
    pub fn leader(&self) -> u32 {
        self.leader
    }

    /// The host path of `path` inside the container.
    pub fn path(&self, path: &str) -> PathBuf {
        self.dir.join(path.trim_start_matches('/'))
    }

    /// A command that runs `program` in the container, as its root user with a clean
    /// environment.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.leader.to_string(), "-a", "--"])
            .arg(program)
            .env_clear()
            .env("PATH", PATH)
            .env("LANG", "C.UTF-8")
            .env("SYSTEMD_PAGER", "")
            .env("TERM", "dumb")
            .stdin(Stdio::null());
        c
    }

    /// Runs the shell script `script` in the container; fails with its output unless it
    /// succeeds; returns its standard output, trimmed.
    pub fn sh(&self, script: &str) -> Result<String> {
        let out = run_ok(self.command("/bin/sh").args(["-ec", script]))
            .with_context(|| format!("on {}: {script}", self.name))?;
        Ok(stdout(&out))
    }

    /// Runs `script` and returns its output whether or not it succeeded.
    pub fn sh_raw(&self, script: &str) -> Result<Output> {
        Ok(self.command("/bin/sh").args(["-c", script]).output()?)
    }

    /// Waits for `systemctl is-system-running` to say `running` or `degraded` (the latter
    /// with the failed units in the error if it is not what the test accepts).
    pub fn wait_running(&self, limit: Duration) -> Result<String> {
        let state = wait_for(&format!("{} to finish booting", self.name), limit, || {
            let out = self
                .command("systemctl")
                .args(["is-system-running", "--wait"])
                .output()
                .ok()?;
            let s = stdout(&out);
            matches!(s.as_str(), "running" | "degraded").then_some(s)
        })
        .with_context(|| {
            format!(
                "console of {}:\n{}",
                self.name,
                std::fs::read_to_string(&self.console).unwrap_or_default()
            )
        })?;
        Ok(state)
    }

    /// The main pid of `unit` inside the container (0 when it has none).
    pub fn main_pid(&self, unit: &str) -> Result<u32> {
        Ok(self
            .sh(&format!("systemctl show -P MainPID {unit}"))?
            .parse()?)
    }

    /// A property of `unit`.
    pub fn property(&self, unit: &str, property: &str) -> Result<String> {
        self.sh(&format!("systemctl show -P {property} {unit}"))
    }
}

impl Container {
    /// Tells nspawn to shut the container down (SIGTERM: its init gets SIGRTMIN+3) without
    /// waiting for it.
    fn begin_shutdown(&mut self) {
        if !self.stopping {
            self.stopping = true;
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.nspawn.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }

    /// Shuts `containers` down together: all are told at once, so that their systemds stop
    /// their units side by side, then each is waited for (as it drops).
    pub fn shut_down_all(mut containers: Vec<Container>) {
        for c in &mut containers {
            c.begin_shutdown();
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.begin_shutdown();
        let nspawn = &mut self.nspawn;
        if wait_for("the container to stop", SHUTDOWN, || {
            nspawn.try_wait().ok().flatten()
        })
        .is_err()
        {
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
    }
}
