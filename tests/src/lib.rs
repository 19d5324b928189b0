//! Fixtures for the end-to-end tests: locating the guest image and the project's binaries,
//! driving the guest agent over a serial line, and starting guests under the reference VMM.
//!
//! Tests that need /dev/kvm call [`kvm_available`] first (or start from [`GuestTest::new`],
//! which does): without KVM they report themselves skipped, unless `REQUIRE_KVM=1` (CI) makes
//! that a failure.

pub mod agent;
pub mod cluster;
pub mod cluster_hosts;
pub mod etcd;
pub mod faults;
pub mod fencing;
pub mod image;
pub mod metrics;
pub mod migrated;
pub mod nbd_socket;
pub mod netns;
pub mod ns_storaged;
pub mod pki;
pub mod process;
pub mod qemu;
pub mod snapshot;
pub mod stats;
pub mod storaged;
pub mod systemd;
pub mod tiny;
pub mod two_hosts;
pub mod vhost;
pub mod vmm;
pub mod workload;

use crate::image::GuestImage;
use std::path::PathBuf;

/// Whether KVM tests can run here. Without /dev/kvm this prints why the caller skips, or panics
/// when `REQUIRE_KVM=1`.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{test}: /dev/kvm is not usable and REQUIRE_KVM=1");
        }
        eprintln!("SKIPPED {test}: /dev/kvm is not usable on this machine");
    }
    ok
}

/// What a test of the guest starts from: the test guest's image and a directory of the test's
/// own (for its VMMs, disks and daemons; removed when the test ends).
pub struct GuestTest {
    /// The test guest.
    pub image: GuestImage,
    /// The test's directory.
    pub dir: tempfile::TempDir,
}

impl GuestTest {
    /// The fixture of `test`, or `None` when the test cannot run here and reports itself skipped
    /// (no /dev/kvm: see [`kvm_available`]). Panics with the command that builds the guest image
    /// when it is missing.
    pub fn new(test: &str) -> Option<GuestTest> {
        if !kvm_available(test) {
            return None;
        }
        Some(GuestTest {
            image: crate::image::guest_image(),
            dir: tempfile::tempdir().unwrap(),
        })
    }
}

/// Runs `fut` to completion on a runtime of its own, on a thread of its own: the fixtures'
/// synchronous helpers call async clients with it, from plain tests and async ones alike.
pub fn block_on<F>(fut: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime")
                .block_on(fut)
        })
        .join()
        .expect("the runtime thread")
    })
}

/// Path of one of the workspace's binaries, built by `cargo build --workspace --bins`.
pub fn binary(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps/, the demo in target/<profile>/.
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("executable dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` (scripts/test does)",
        path.display()
    );
    path
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for a listener another process binds).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Writes `secret` as a cluster token file (mode 0600) in `dir`; returns its path.
pub fn write_token(dir: &std::path::Path, secret: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("cluster.token");
    std::fs::write(&path, format!("{secret}\n"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path)
}
