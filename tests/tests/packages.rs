//! The Debian packages (`scripts/package`, cargo-deb), made from the binaries the suite built:
//! each holds its binaries (the VMM linked statically, the others not), a manual page for every
//! command and subcommand (as the binaries make them), its systemd unit (clean under
//! `systemd-analyze verify`, installed neither enabled nor started) and its settings as a
//! conffile; the settings file as packaged is what the daemon reads: pointed at a test directory
//! and certificate, storaged starts from it.

use e2e::pki::Pki;
use e2e::process::{run_ok, terminate, wait_for};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

/// One package: its name, binaries, unit and conffile.
struct Package {
    name: &'static str,
    bins: &'static [&'static str],
    unit: &'static str,
    conffile: &'static str,
    /// Files of `/usr/share/doc/NAME/examples/`.
    examples: &'static [&'static str],
}

const PACKAGES: [Package; 2] = [
    Package {
        name: "vmhop-storaged",
        bins: &["storaged"],
        unit: "storaged.service",
        conffile: "/etc/storaged/storaged.toml",
        examples: &[
            "storaged-cluster.toml",
            "storaged-cluster.conf",
            "etcd.default",
        ],
    },
    Package {
        name: "vmhop-migrated",
        bins: &["migrated", "migratectl", "vmm", "vhost-user-blk"],
        unit: "migrated.service",
        conffile: "/etc/migrated/migrated.toml",
        examples: &["guest.toml"],
    },
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run_ok(cmd).unwrap().stdout).unwrap()
}

/// The file names of the manual pages `bin` makes of itself.
fn pages_of(bin: &str, dir: &Path) -> Vec<String> {
    let out = stdout(
        Command::new(e2e::binary(bin))
            .arg("--generate-man-pages")
            .arg(dir),
    );
    out.lines()
        .map(|l| {
            Path::new(l)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

#[test]
fn packages_hold_binaries_pages_units_and_settings() {
    let cargo_deb = Command::new("cargo").args(["deb", "--version"]).output();
    assert!(
        cargo_deb.is_ok_and(|o| o.status.success()),
        "cargo-deb is missing: run scripts/setup"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("debs");
    let made = stdout(
        Command::new(workspace().join("scripts/package"))
            .args(["--no-build", "--profile", "dev", "--out"])
            .arg(&out),
    );
    let root = dir.path().join("root");
    for p in &PACKAGES {
        let deb = out.join(format!(
            "{}_{}-1_amd64.deb",
            p.name,
            env!("CARGO_PKG_VERSION")
        ));
        assert!(
            deb.exists(),
            "{} not made; scripts/package said:\n{made}",
            deb.display()
        );
        let fields = stdout(
            Command::new("dpkg-deb")
                .arg("-f")
                .arg(&deb)
                .args(["Package", "Depends"]),
        );
        assert!(fields.contains(&format!("Package: {}", p.name)), "{fields}");
        assert!(fields.contains("libc6"), "{fields}");

        let listing = stdout(Command::new("dpkg-deb").arg("-c").arg(&deb));
        let files: BTreeSet<String> = listing
            .lines()
            .filter(|l| !l.starts_with('d'))
            .map(|l| {
                l.rsplit(' ')
                    .next()
                    .unwrap()
                    .trim_start_matches('.')
                    .to_string()
            })
            .collect();
        for bin in p.bins {
            let line = listing
                .lines()
                .find(|l| l.ends_with(&format!("./usr/bin/{bin}")));
            let line =
                line.unwrap_or_else(|| panic!("{} lacks /usr/bin/{bin}:\n{listing}", p.name));
            assert!(line.starts_with("-rwxr-xr-x"), "{line}");
            for page in pages_of(bin, &dir.path().join("pages")) {
                let path = format!("/usr/share/man/man1/{page}.gz");
                assert!(files.contains(&path), "{} lacks {path}", p.name);
            }
        }
        let unit = format!("/usr/lib/systemd/system/{}", p.unit);
        assert!(files.contains(&unit), "{} lacks {unit}", p.name);
        assert!(
            files.contains(p.conffile),
            "{} lacks {}",
            p.name,
            p.conffile
        );

        for e in p.examples {
            let path = format!("/usr/share/doc/{}/examples/{e}", p.name);
            assert!(files.contains(&path), "{} lacks {path}", p.name);
        }

        let control = dir.path().join(format!("{}.control", p.name));
        run_ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control)).unwrap();
        let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
        assert_eq!(
            conffiles.trim(),
            p.conffile,
            "the settings file must be a conffile"
        );
        let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
        assert!(postinst.contains("daemon-reload"), "{postinst}");
        assert!(
            !postinst.contains("deb-systemd-invoke start") && !postinst.contains("--now"),
            "the unit must not start before the host is configured:\n{postinst}"
        );
        run_ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root)).unwrap();
        let version = stdout(Command::new(root.join("usr/bin").join(p.bins[0])).arg("--version"));
        assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
        for bin in p.bins {
            // The VMM is packaged linked statically; the daemons are not.
            let headers = stdout(
                Command::new("readelf")
                    .arg("-lW")
                    .arg(root.join("usr/bin").join(bin)),
            );
            let dynamic = headers.contains("INTERP");
            assert_eq!(
                dynamic,
                *bin != "vmm",
                "/usr/bin/{bin} of {}:\n{headers}",
                p.name
            );
        }
    }

    // The units as installed, against the host's own units for the targets they name; no
    // warning either (an unknown key or section is only a warning). storaged's with the drop-in
    // of a cluster node installed as the README says.
    let examples = root.join("usr/share/doc/vmhop-storaged/examples");
    let drop_in = root.join("etc/systemd/system/storaged.service.d");
    std::fs::create_dir_all(&drop_in).unwrap();
    std::fs::copy(
        examples.join("storaged-cluster.conf"),
        drop_in.join("cluster.conf"),
    )
    .unwrap();
    let units = root.join("usr/lib/systemd/system");
    for entry in std::fs::read_dir("/usr/lib/systemd/system").unwrap() {
        let entry = entry.unwrap();
        let to = units.join(entry.file_name());
        if !to.exists() && entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to).unwrap();
        }
    }
    for p in &PACKAGES {
        let o = run_ok(
            Command::new("systemd-analyze")
                .args(["verify", "--man=no"])
                .arg(format!("--root={}", root.display()))
                .arg(format!("/usr/lib/systemd/system/{}", p.unit)),
        )
        .unwrap();
        let said = String::from_utf8_lossy(&o.stderr);
        assert!(
            said.trim().is_empty(),
            "systemd-analyze verify {}: {said}",
            p.unit
        );
    }

    // storaged from the packaged settings file, with only its paths and addresses moved into
    // this test: it requires TLS of every client and becomes ready.
    let pki = Pki::new(dir.path(), "cluster").unwrap();
    let tls = pki.host("storage").unwrap();
    let data = dir.path().join("data");
    let token = dir.path().join("token");
    std::fs::write(&token, "a-cluster-token-of-the-test\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let settings = std::fs::read_to_string(root.join("etc/storaged/storaged.toml"))
        .unwrap()
        .replace("/var/lib/storaged", &data.display().to_string())
        .replace("/etc/vmhop/tls", &tls.display().to_string())
        .replace("/etc/storaged/token", &token.display().to_string())
        .replace("0.0.0.0:10809", "127.0.0.1:0")
        .replace("0.0.0.0:10810", "127.0.0.1:0");
    let (_, status, log) = serve_packaged(&root, dir.path(), &settings);
    assert!(status.success(), "{status}: {log}");
    assert!(
        log.contains("tls_dir=")
            && log.contains("plaintext_loopback=false")
            && !log.contains("WARN"),
        "the packaged settings require TLS of every client:\n{log}"
    );
    cluster_node_from_the_examples(dir.path(), &root, &pki, &token);
}

/// etcd from the packaged `etcd.default` (the variables Debian's etcd unit passes it) and a
/// storaged node from the packaged `storaged-cluster.toml`, their addresses and paths moved
/// into this test: etcd serves, the node joins the cluster under its certificate's host id
/// and becomes ready.
fn cluster_node_from_the_examples(dir: &Path, root: &Path, pki: &Pki, token: &Path) {
    let examples = root.join("usr/share/doc/vmhop-storaged/examples");
    let (client, peer) = (e2e::free_port().unwrap(), e2e::free_port().unwrap());
    let etcd_url = format!("http://127.0.0.1:{client}");
    let move_etcd = |v: &str| {
        v.replace("10.0.0.20:2379", &format!("127.0.0.1:{client}"))
            .replace("10.0.0.20:2380", &format!("127.0.0.1:{peer}"))
            .replace(
                "/var/lib/etcd/default",
                &dir.join("etcd-data").display().to_string(),
            )
    };
    let text = std::fs::read_to_string(examples.join("etcd.default")).unwrap();
    let env: Vec<(String, String)> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=VALUE: {l}"));
            assert!(k.starts_with("ETCD_"), "{l}");
            (k.to_string(), move_etcd(v))
        })
        .collect();
    assert!(
        env.iter().any(|(k, _)| k == "ETCD_LISTEN_CLIENT_URLS"),
        "{text}"
    );
    let _etcd = e2e::etcd::Etcd::start_from_env(dir, env, &etcd_url).unwrap();

    let node_dir = dir.join("node");
    std::fs::create_dir_all(&node_dir).unwrap();
    let tls = pki.host("storage-1").unwrap();
    let mut settings = std::fs::read_to_string(examples.join("storaged-cluster.toml"))
        .unwrap()
        .replace(
            "/var/lib/storaged",
            &node_dir.join("data").display().to_string(),
        )
        .replace("/etc/vmhop/tls", &tls.display().to_string())
        .replace("/etc/storaged/token", &token.display().to_string())
        .replace("http://10.0.0.20:2379", &etcd_url);
    for port in [10809, 10810, 10811] {
        let addr = format!("\"10.0.0.9:{port}\"");
        assert!(settings.contains(&addr), "{settings}");
        settings = settings.replace(&addr, "\"127.0.0.1:0\"");
    }
    let (joined, status, log) = serve_packaged(root, &node_dir, &settings);
    assert!(joined["repl"].is_string(), "{joined}: {log}");
    assert!(status.success(), "{status}: {log}");
    assert!(
        log.contains("cluster mode") && log.contains("node=storage-1"),
        "the node joins under its certificate's host id:\n{log}"
    );
}

/// Runs the packaged storaged on `settings` (written to `dir/storaged.toml`) until it is ready,
/// then stops it with SIGTERM; returns what its ready file says, its exit status and its log.
fn serve_packaged(
    root: &Path,
    dir: &Path,
    settings: &str,
) -> (serde_json::Value, ExitStatus, String) {
    let config = dir.join("storaged.toml");
    std::fs::write(&config, settings).unwrap();
    let ready = dir.join("ready");
    let mut storaged = Command::new(root.join("usr/bin/storaged"))
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let said = wait_for("storaged to be ready", Duration::from_secs(30), || {
        if let Ok(Some(st)) = storaged.try_wait() {
            return Some(Err(st));
        }
        let text = std::fs::read_to_string(&ready).ok()?;
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .map(Ok)
    })
    .unwrap();
    let status = match said {
        Ok(_) => terminate(&mut storaged, "storaged", Duration::from_secs(30)).unwrap(),
        Err(st) => st,
    };
    let mut log = String::new();
    std::io::Read::read_to_string(&mut storaged.stderr.take().unwrap(), &mut log).unwrap();
    let said = said.unwrap_or_else(|st| panic!("storaged exited ({st}):\n{log}\n{settings}"));
    (said, status, log)
}
