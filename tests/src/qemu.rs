//! The reference VMM: the test guest under qemu-system-x86_64 (`-M microvm,acpi=off`), used to
//! prove the image and for side-by-side comparisons.

use crate::agent::AgentConn;
use crate::image::GuestImage;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A guest running under QEMU; killed on drop.
pub struct QemuGuest {
    child: Child,
    /// The agent on the guest's serial line.
    pub agent: AgentConn,
    /// Where the serial output is logged.
    pub serial_log: PathBuf,
}

/// What to run.
pub struct QemuConfig<'a> {
    /// Kernel, root filesystem and command line.
    pub image: &'a GuestImage,
    /// Data disks after the root disk (vdb, vdc, ...), raw files.
    pub data_disks: Vec<PathBuf>,
    /// When not empty, the guest's disks are these vhost-user-blk backends' sockets (vda
    /// first) instead of the image's root file system and `data_disks`; guest memory is then
    /// a shared memfd, which the backends map.
    pub vhost_user_disks: Vec<PathBuf>,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Directory for logs.
    pub work_dir: &'a Path,
}

impl QemuGuest {
    /// The reference command line for `cfg`: machine, CPU, memory, kernel, command line and
    /// the disks; the caller adds where the serial line (and a monitor) go.
    pub fn command(cfg: &QemuConfig) -> Command {
        let mut cmd = Command::new("qemu-system-x86_64");
        let vhost_user = !cfg.vhost_user_disks.is_empty();
        let machine = if vhost_user {
            "microvm,acpi=off,memory-backend=mem"
        } else {
            "microvm,acpi=off"
        };
        cmd.args(["-enable-kvm", "-M", machine, "-cpu", "kvm64,-cx16"])
            .args([
                "-m",
                &cfg.mem_mib.to_string(),
                "-smp",
                &cfg.vcpus.to_string(),
            ])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(&cfg.image.kernel)
            .args(["-append", &cfg.image.cmdline]);
        // QEMU's microvm places the first -device on the highest virtio-mmio slot, which the
        // kernel probes first: the order here is the order of vda, vdb, ...
        if vhost_user {
            cmd.arg("-object").arg(format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                cfg.mem_mib
            ));
            for (i, socket) in cfg.vhost_user_disks.iter().enumerate() {
                cmd.arg("-chardev")
                    .arg(format!("socket,id=vu{i},path={}", socket.display()))
                    .args(["-device", &format!("vhost-user-blk,chardev=vu{i}")]);
            }
            return cmd;
        }
        let mut drives = vec![(cfg.image.rootfs.clone(), true)];
        drives.extend(cfg.data_disks.iter().map(|d| (d.clone(), false)));
        for (i, (path, ro)) in drives.iter().enumerate() {
            let mut drive = format!(
                "id=d{i},file={},format=raw,if=none,cache=none,aio=threads",
                path.display()
            );
            if *ro {
                drive.push_str(",readonly=on");
            }
            cmd.args([
                "-drive",
                &drive,
                "-device",
                &format!("virtio-blk-device,drive=d{i}"),
            ]);
        }
        cmd
    }

    /// Starts QEMU with the serial line on its stdio.
    pub fn start(cfg: &QemuConfig) -> Result<QemuGuest> {
        let mut cmd = Self::command(cfg);
        cmd.args(["-serial", "stdio"]);
        let stderr_log = cfg.work_dir.join("qemu.stderr");
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log)?);
        let mut child = cmd
            .spawn()
            .context("spawn qemu-system-x86_64 (run scripts/setup)")?;
        let serial_log = cfg.work_dir.join("serial.log");
        let agent = AgentConn::new(
            child.stdout.take().unwrap(),
            child.stdin.take().unwrap(),
            &serial_log,
        )?;
        Ok(QemuGuest {
            child,
            agent,
            serial_log,
        })
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
