//! Where the processes migrated starts for a guest (its VMM, its vhost-user disk backends)
//! live: on a host booted with systemd, each in a transient scope unit of its own
//! (`vmhop-vm-INSTANCE.scope`, `vmhop-disk-INSTANCE-N.scope`), made by `systemd-run --scope`,
//! which asks systemd for the scope, moves itself into it and then executes the program, so
//! the pid migrated records is the program's. Out of migrated's cgroup, a guest is untouched
//! when systemd stops or restarts the agent (whatever its unit's `KillMode`), its resources
//! are accounted to it (`systemd-cgls`, `systemctl status vmhop-vm-INSTANCE.scope`) and an
//! operator can stop it by its unit name. Without systemd (a development machine, a
//! container without an init) the programs are plain children in a process group of their own.

use std::path::{Path, PathBuf};

/// The directory that exists when systemd is the init system (`sd_booted(3)`).
const SYSTEMD_RUNTIME: &str = "/run/systemd/system";

/// How programs are started: in a scope of their own, or as plain children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launcher {
    /// Plain children of migrated.
    Plain,
    /// `systemd-run --scope` with the given binary.
    Scope(PathBuf),
}

impl Launcher {
    /// Scopes when this host was booted with systemd and `systemd-run` is on the `PATH`,
    /// plain children otherwise.
    pub fn detect() -> Launcher {
        if !Path::new(SYSTEMD_RUNTIME).is_dir() {
            return Launcher::Plain;
        }
        match find_in_path("systemd-run") {
            Some(p) => Launcher::Scope(p),
            None => {
                tracing::warn!(
                    "systemd is the init system but systemd-run is not on the PATH: guests run \
                     inside migrated's own cgroup"
                );
                Launcher::Plain
            }
        }
    }

    /// A command that runs `program` as the unit `unit` (without `.scope`) with `description`,
    /// or just `program` without systemd. Arguments added to it go to `program`.
    pub fn command(
        &self,
        program: &Path,
        unit: &str,
        description: &str,
    ) -> tokio::process::Command {
        match self {
            Launcher::Plain => tokio::process::Command::new(program),
            Launcher::Scope(systemd_run) => {
                let mut cmd = tokio::process::Command::new(systemd_run);
                cmd.args(["--scope", "--quiet", "--collect"])
                    .arg(format!("--unit={unit}"))
                    .arg(format!("--description={description}"))
                    .arg("--")
                    .arg(program);
                cmd
            }
        }
    }
}

/// The launcher of this process, detected once (and logged).
pub fn launcher() -> &'static Launcher {
    static LAUNCHER: std::sync::OnceLock<Launcher> = std::sync::OnceLock::new();
    LAUNCHER.get_or_init(|| {
        let l = Launcher::detect();
        match &l {
            Launcher::Plain => tracing::info!("guests run as children of migrated"),
            Launcher::Scope(_) => tracing::info!("guests run in systemd scopes of their own"),
        }
        l
    })
}

/// The scope of an instance's VMM (instance names are valid in unit names, see
/// [`crate::config::validate_name`]).
pub fn vmm_unit(instance: &str) -> String {
    format!("vmhop-vm-{instance}")
}

/// The scope of an instance's vhost-user backend of disk `disk`.
pub fn disk_unit(instance: &str, disk: usize) -> String {
    format!("vmhop-disk-{instance}-{disk}")
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_runs_the_program_after_systemd_runs_options() {
        let l = Launcher::Scope("/usr/bin/systemd-run".into());
        let mut cmd = l.command(
            Path::new("/usr/bin/vmm"),
            &vmm_unit("vm1"),
            "vmhop guest vm1",
        );
        cmd.arg("run");
        let std = cmd.as_std();
        assert_eq!(std.get_program(), "/usr/bin/systemd-run");
        let args: Vec<_> = std.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(
            args,
            [
                "--scope",
                "--quiet",
                "--collect",
                "--unit=vmhop-vm-vm1",
                "--description=vmhop guest vm1",
                "--",
                "/usr/bin/vmm",
                "run"
            ]
        );
        let plain = Launcher::Plain.command(Path::new("/usr/bin/vmm"), "u", "d");
        assert_eq!(plain.as_std().get_program(), "/usr/bin/vmm");
        assert_eq!(disk_unit("vm1", 2), "vmhop-disk-vm1-2");
    }
}
