//! vhost-user-blk backends for the end-to-end tests, each a process killed on drop: our
//! `vhost-user-blk` serving a storaged volume or a file, and qemu-storage-daemon's
//! vhost-user-blk export (a backend nobody here wrote).

use crate::process::wait_for;
use crate::storaged::Storaged;
use anyhow::{Context, Result};
use std::ffi::OsString;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long a backend may take to create its socket (a storaged backend connects first).
const SOCKET_TIMEOUT: Duration = Duration::from_secs(60);

/// A backend process listening on a Unix socket.
pub struct Backend {
    child: Option<Child>,
    program: OsString,
    args: Vec<OsString>,
    /// The socket the frontend connects to.
    pub socket: PathBuf,
    /// stderr of the current run.
    pub log_path: PathBuf,
    runs: u32,
}

impl Backend {
    /// `vhost-user-blk --socket DIR/NAME.sock ARGS...`.
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> Result<Backend> {
        let socket = dir.join(format!("{name}.sock"));
        let mut all: Vec<OsString> = vec!["--socket".into(), socket.clone().into()];
        all.extend(args.iter().map(OsString::from));
        Self::spawn(
            crate::binary("vhost-user-blk").into(),
            all,
            socket,
            dir,
            name,
        )
    }

    /// Our backend serving `volume` of `storaged` as `host` (instance `vm`) with `lease`
    /// (`primary` or `standby`), plus `extra` flags.
    pub fn storaged(
        dir: &Path,
        name: &str,
        storaged: &Storaged,
        volume: &str,
        host: &str,
        lease: &str,
        extra: &[&str],
    ) -> Result<Backend> {
        let nbd = storaged.nbd.to_string();
        let mut args = vec![
            "--storaged",
            &nbd,
            "--volume",
            volume,
            "--host-id",
            host,
            "--instance-id",
            "vm",
            "--lease",
            lease,
        ];
        args.extend_from_slice(extra);
        Self::start(dir, name, &args)
    }

    /// Our backends for a guest's two disks on `storaged` as `host`: volume `root` (filled
    /// with the image's root file system first, served read-only) and volume `data` (with
    /// `data_extra` flags), sockets `root.sock` and `data.sock` in `dir`.
    pub fn root_and_data(
        dir: &Path,
        storaged: &Storaged,
        rootfs: &Path,
        host: &str,
        data_extra: &[&str],
    ) -> Result<(Backend, Backend)> {
        storaged.create_volume_from("root", rootfs)?;
        let root = Self::storaged(
            dir,
            "root",
            storaged,
            "root",
            host,
            "primary",
            &["--read-only"],
        )?;
        let data = Self::storaged(dir, "data", storaged, "data", host, "primary", data_extra)?;
        Ok((root, data))
    }

    /// qemu-storage-daemon exporting the raw image `image` as vhost-user-blk on
    /// DIR/NAME.sock, writable; without QEMU's image locking, so that a migration's
    /// destination can export the same image (as two hosts would share a network disk).
    pub fn qemu_storage_daemon(dir: &Path, name: &str, image: &Path) -> Result<Backend> {
        let socket = dir.join(format!("{name}.sock"));
        let args: Vec<OsString> = vec![
            "--blockdev".into(),
            format!(
                "driver=file,node-name=file0,filename={},aio=threads,locking=off",
                image.display()
            )
            .into(),
            "--blockdev".into(),
            "driver=raw,node-name=disk0,file=file0".into(),
            "--export".into(),
            format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
                socket.display()
            )
            .into(),
        ];
        Self::spawn("qemu-storage-daemon".into(), args, socket, dir, name)
    }

    fn spawn(
        program: OsString,
        args: Vec<OsString>,
        socket: PathBuf,
        dir: &Path,
        name: &str,
    ) -> Result<Backend> {
        let mut b = Backend {
            child: None,
            program,
            args,
            socket,
            log_path: dir.join(format!("{name}.0.log")),
            runs: 0,
        };
        b.run(dir)?;
        Ok(b)
    }

    fn run(&mut self, dir: &Path) -> Result<()> {
        let name = self
            .socket
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy();
        self.log_path = dir.join(format!("{name}.{}.log", self.runs));
        self.runs += 1;
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new(&self.program)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log_path)?)
            .spawn()
            .with_context(|| format!("spawn {:?}", self.program))?;
        let child = self.child.insert(child);
        let socket = self.socket.clone();
        let log = self.log_path.clone();
        wait_for("the backend's socket", SOCKET_TIMEOUT, || {
            if let Ok(Some(st)) = child.try_wait() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Some(Err(anyhow::anyhow!("backend exited ({st}):\n{text}")));
            }
            let is_socket = std::fs::metadata(&socket).is_ok_and(|m| m.file_type().is_socket());
            is_socket.then_some(Ok(()))
        })?
    }

    /// SIGKILL: the backend dies with whatever it had in flight.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the same command again (after [`Self::kill9`]) and waits for its socket.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        let dir = self.log_path.parent().context("log dir")?.to_path_buf();
        self.run(&dir)
    }

    /// The current run's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill9();
    }
}
