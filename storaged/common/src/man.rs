//! Manual pages, made from a binary's command line definition with `clap_mangen`.
//!
//! Every binary of the project takes one hidden first argument, [`FLAG`]: `storaged
//! --generate-man-pages DIR` writes `storaged.1` and one page per subcommand, named as git
//! names its own (`storaged-serve.1`, `storaged-volume-create.1`, ...), and exits. The
//! packages are built with these pages (`scripts/package`), so the pages always say what the
//! binary accepts.

use clap::Command;
use std::path::{Path, PathBuf};

/// The hidden first argument that asks for the pages.
pub const FLAG: &str = "--generate-man-pages";

/// If the process was started as `BINARY --generate-man-pages DIR`, writes the pages of `cmd`
/// into `DIR`, prints their paths and exits (status 1 with the reason when a page cannot be
/// written); otherwise returns and the binary goes on as usual.
pub fn generate_if_asked(cmd: impl FnOnce() -> Command) {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(FLAG.as_ref()) {
        return;
    }
    let Some(dir) = args.next() else {
        eprintln!("usage: {FLAG} DIR");
        std::process::exit(2);
    };
    match write_pages(cmd(), Path::new(&dir)) {
        Ok(pages) => {
            for p in pages {
                println!("{}", p.display());
            }
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!(
                "writing the manual pages into {}: {e}",
                Path::new(&dir).display()
            );
            std::process::exit(1);
        }
    }
}

/// Writes the page of `cmd` and of each of its visible subcommands, at any depth, into `dir`
/// (created); returns the files written.
pub fn write_pages(cmd: Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd;
    cmd.build();
    let mut written = Vec::new();
    let name = cmd.get_name().to_string();
    write_tree(&cmd, &name, dir, &mut written)?;
    Ok(written)
}

fn write_tree(
    cmd: &Command,
    name: &str,
    dir: &Path,
    out: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let page = cmd
        .clone()
        .name(name.to_string())
        .bin_name(name.replace('-', " "));
    let path = dir.join(format!("{name}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(page).render(&mut buf)?;
    std::fs::write(&path, buf)?;
    out.push(path);
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        write_tree(sub, &format!("{name}-{}", sub.get_name()), dir, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    #[test]
    fn one_page_per_visible_command_with_its_options() {
        let cmd = Command::new("tool")
            .about("Does things")
            .subcommand(
                Command::new("volume")
                    .about("Volumes")
                    .subcommand(Command::new("create").arg(Arg::new("size").long("size"))),
            )
            .subcommand(Command::new("secret").hide(true))
            .arg(
                Arg::new("verbose")
                    .long("verbose")
                    .action(ArgAction::SetTrue),
            );
        let dir = tempfile::tempdir().unwrap();
        let pages = write_pages(cmd, dir.path()).unwrap();
        let names: Vec<_> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["tool.1", "tool-volume.1", "tool-volume-create.1"]);
        let create = std::fs::read_to_string(dir.path().join("tool-volume-create.1")).unwrap();
        assert!(create.starts_with(".ie"), "{create}");
        assert!(create.contains("size"), "{create}");
        let top = std::fs::read_to_string(dir.path().join("tool.1")).unwrap();
        assert!(
            top.contains("Does things") && top.contains("verbose"),
            "{top}"
        );
    }
}
