//! The source and destination state machines with no test double: two agents in this process
//! (each serving its REST API on loopback), the real `vmm` binary for every VMM, and a real
//! storaged (in process, real NBD lease connections, flips, rollbacks). The guest is a tiny
//! PVH kernel that halts in a loop, so a VMM starts at once and its migration stream is all
//! the real protocol (memory, vCPU and device state) without a Linux boot. Needs /dev/kvm and
//! the workspace's binaries (`cargo build --workspace --bins`).
//!
//! Covered: a migration there and back (every lease flips, the destination VMM runs, the source
//! VMM ends and its deactivated leases are released); a flip storaged refuses after another
//! volume flipped (rolled back, the destination's VMM ended, the real source VMM resumed); a
//! destination still deactivated on a volume (its incoming VMM is refused: the migration
//! aborts before anything moved).
//! The phases a real guest needs time in (pre-copy, a restart in the middle) are driven with
//! doubles in `migration_source.rs` and with real guests in the end-to-end tests.

mod common;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use migrated::agent::Agent;
use migrated::api::MigrateRequest;
use migrated::config::AgentConfig;
use migrated::instance::InstanceState;
use migrated::migration::record::{MigrationParams, MigrationRecord, Phase};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storaged::flip::{self, FlipTrigger};
use storaged::registry::Registry;
use storaged_client::api::LeaseState;
use storaged_client::protocol::RequestedState;
use storaged_client::rest::StoragedApi;
use vmhop_common::token::Token;
use vmm_api::vm::RunState;

const VOLUMES: [&str; 2] = ["v1", "v2"];
const DEADLINE: Duration = Duration::from_secs(120);

/// Guest physical address the code is loaded at and entered at.
const ENTRY: u64 = 0x20_0000;
/// hlt; jmp -3.
const CODE: &[u8] = &[0xf4, 0xeb, 0xfd];

/// An ELF64 kernel with one PT_LOAD of [`CODE`] and the PVH entry note (as in the vmm's fault
/// test).
fn tiny_pvh_kernel() -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    const NOTE_AT: usize = EHDR + 2 * PHDR;
    const NOTE_LEN: usize = 12 + 4 + 4;
    const CODE_AT: usize = 256;
    let mut f = vec![0u8; CODE_AT + CODE.len()];
    let put16 = |f: &mut [u8], at: usize, v: u16| f[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |f: &mut [u8], at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |f: &mut [u8], at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_le_bytes());
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // ELF version
    put16(&mut f, 16, 2); // ET_EXEC
    put16(&mut f, 18, 0x3e); // x86-64
    put32(&mut f, 20, 1);
    put64(&mut f, 24, ENTRY);
    put64(&mut f, 32, EHDR as u64);
    put16(&mut f, 52, EHDR as u16);
    put16(&mut f, 54, PHDR as u16);
    put16(&mut f, 56, 2);
    let p = EHDR; // PT_LOAD
    put32(&mut f, p, 1);
    put32(&mut f, p + 4, 5);
    put64(&mut f, p + 8, CODE_AT as u64);
    put64(&mut f, p + 16, ENTRY);
    put64(&mut f, p + 24, ENTRY);
    put64(&mut f, p + 32, CODE.len() as u64);
    put64(&mut f, p + 40, CODE.len() as u64);
    put64(&mut f, p + 48, 0x1000);
    let p = EHDR + PHDR; // PT_NOTE, XEN_ELFNOTE_PHYS32_ENTRY
    put32(&mut f, p, 4);
    put32(&mut f, p + 4, 4);
    put64(&mut f, p + 8, NOTE_AT as u64);
    put64(&mut f, p + 32, NOTE_LEN as u64);
    put64(&mut f, p + 40, NOTE_LEN as u64);
    put64(&mut f, p + 48, 4);
    put32(&mut f, NOTE_AT, 4);
    put32(&mut f, NOTE_AT + 4, 4);
    put32(&mut f, NOTE_AT + 8, 18);
    f[NOTE_AT + 12..NOTE_AT + 16].copy_from_slice(b"Xen\0");
    put32(&mut f, NOTE_AT + 16, ENTRY as u32);
    f[CODE_AT..].copy_from_slice(CODE);
    f
}

/// The workspace's `vmm`, next to this test's directory; fails loudly when it is not built.
fn vmm_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join("vmm");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins`",
        p.display()
    );
    p
}

fn kvm_available(test: &str) -> bool {
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

/// storaged's API with one twist: while `refuse_v2` is set, a flip of v2 is preceded by the
/// revocation of the destination's standby lease, so storaged refuses it for real.
#[derive(Clone)]
struct StorageState {
    reg: Arc<Registry>,
    refuse_v2: Arc<AtomicBool>,
}

async fn flip_v2(
    State(s): State<StorageState>,
    Json(req): Json<storaged_client::api::FlipRequest>,
) -> Result<Json<storaged_client::api::FlipReport>, (StatusCode, String)> {
    let err = |e: storaged::registry::RegistryError| (StatusCode::CONFLICT, e.to_string());
    let vol = s.reg.get("v2").map_err(err)?;
    let to = req.to.as_deref();
    if s.refuse_v2.load(Ordering::SeqCst) {
        if let Some(host) = to {
            flip::revoke(&s.reg, &vol, host, None).await.map_err(err)?;
        }
    }
    let report = flip::flip(&s.reg, &vol, to, FlipTrigger::Api)
        .await
        .map_err(err)?;
    Ok(Json(report))
}

/// storaged with a switch that makes it refuse flips of v2.
struct Storage {
    inner: common::Storage,
    refuse_v2: Arc<AtomicBool>,
}

impl std::ops::Deref for Storage {
    type Target = common::Storage;
    fn deref(&self) -> &common::Storage {
        &self.inner
    }
}

async fn storage(dir: &Path) -> Storage {
    let refuse_v2 = Arc::new(AtomicBool::new(false));
    let state_refuse = refuse_v2.clone();
    let inner = common::storage(dir, &VOLUMES, move |reg| {
        Router::new()
            .route("/v1/volumes/v2/flip", post(flip_v2))
            .with_state(StorageState {
                reg,
                refuse_v2: state_refuse,
            })
    })
    .await;
    Storage { inner, refuse_v2 }
}

struct Hosts {
    a: Arc<Agent>,
    b: Arc<Agent>,
    storage: Storage,
    leases: StoragedApi,
    kernel: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // The VMMs are separate processes: end them with the test.
        for agent in [&self.a, &self.b] {
            for i in agent.instances() {
                migrated::vmm_process::kill_pid(&i, libc::SIGKILL);
            }
        }
    }
}

async fn hosts() -> Hosts {
    let dir = tempfile::tempdir().unwrap();
    let storage = storage(&dir.path().join("storaged")).await;
    let la = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr_a, addr_b) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    // The two hosts share a token: every peer call below is authenticated.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "real-vmm-test-cluster-secret\n").unwrap();
    let token = Token::load(&token_file).unwrap();
    let cfg = |me: &str, listen: std::net::SocketAddr, peer: &str, peer_addr: String| AgentConfig {
        host_id: me.into(),
        state_dir: dir.path().join(me).join("state"),
        listen,
        socket: dir.path().join(me).join("m.sock"),
        storaged_api: storage.api.clone(),
        storaged_nbd: storage.nbd.clone(),
        vmm_binary: vmm_binary(),
        migration_ip: "127.0.0.1".parse().unwrap(),
        peer_timeout_ms: 3000,
        peers: [(peer.to_string(), peer_addr)].into_iter().collect(),
        ready_file: None,
        token: Some(token.clone()),
        storaged_token: None,
    };
    let a = Agent::open(cfg("a", addr_a, "b", addr_b.to_string())).unwrap();
    let b = Agent::open(cfg("b", addr_b, "a", addr_a.to_string())).unwrap();
    for (l, agent) in [(la, &a), (lb, &b)] {
        let r = migrated::server::tcp_router(agent.clone());
        tokio::spawn(async move { axum::serve(l, r).await });
    }
    let kernel = dir.path().join("hlt.elf");
    std::fs::write(&kernel, tiny_pvh_kernel()).unwrap();
    Hosts {
        a,
        b,
        leases: StoragedApi::new(&storage.api, None),
        storage,
        kernel,
        _dir: dir,
    }
}

async fn migrate(from: &Arc<Agent>, to: &str) -> MigrationRecord {
    let rec = migrated::migration::source::start(
        from,
        "vm1",
        MigrateRequest {
            to: to.into(),
            params: MigrationParams::default(),
        },
    )
    .unwrap();
    let t = Instant::now();
    loop {
        let r = from.migration(&rec.id).unwrap();
        if r.phase.is_terminal() {
            return r;
        }
        assert!(t.elapsed() < DEADLINE, "migration stuck: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn holder(h: &Hosts, v: &str, host: &str) -> Option<LeaseState> {
    h.leases.state_of(v, host).await.unwrap()
}

/// The guest runs on `on` only: its VMM there answers `running`, nothing runs on `off`, and
/// `on` holds every volume alone.
async fn runs_only_on(h: &Hosts, on: &Arc<Agent>, off: &Arc<Agent>) {
    let i = on.instance("vm1").unwrap();
    assert_eq!(i.state, InstanceState::Running, "{i:?}");
    assert!(i.vmm_alive());
    let info = on.vmm(&i).info().await.unwrap();
    assert_eq!(info.state, RunState::Running, "{info:?}");
    if let Ok(o) = off.instance("vm1") {
        assert!(o.state.is_terminal(), "{o:?}");
        assert!(!o.vmm_alive(), "{o:?}");
    }
    for v in VOLUMES {
        assert_eq!(
            holder(h, v, &on.cfg.host_id).await,
            Some(LeaseState::Primary)
        );
        assert_eq!(holder(h, v, &off.cfg.host_id).await, None, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vmms_migrate_there_and_back_flipping_and_releasing_every_lease() {
    if !kvm_available("real_vmms_migrate_there_and_back_flipping_and_releasing_every_lease") {
        return;
    }
    let h = hosts().await;
    h.a.run(common::guest(&h.kernel, &VOLUMES)).await.unwrap();
    runs_only_on(&h, &h.a, &h.b).await;

    let r = migrate(&h.a, "b").await;
    assert_eq!(r.phase, Phase::Completed, "{r:?}");
    assert_eq!(r.flipped, VOLUMES.to_vec());
    assert!(r.figures.bytes_sent > 0, "{r:?}");
    assert!(r.figures.vmm_downtime_us > 0, "{r:?}");
    assert_eq!(
        h.a.instance("vm1").unwrap().state,
        InstanceState::MigratedAway
    );
    runs_only_on(&h, &h.b, &h.a).await;

    let r = migrate(&h.b, "a").await;
    assert_eq!(r.phase, Phase::Completed, "{r:?}");
    runs_only_on(&h, &h.a, &h.b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_flip_rolls_back_and_the_real_source_vmm_resumes() {
    if !kvm_available("a_refused_flip_rolls_back_and_the_real_source_vmm_resumes") {
        return;
    }
    let h = hosts().await;
    let started = h.a.run(common::guest(&h.kernel, &VOLUMES)).await.unwrap();
    h.storage.refuse_v2.store(true, Ordering::SeqCst);

    let r = migrate(&h.a, "b").await;
    assert_eq!(r.phase, Phase::Aborted, "{r:?}");
    assert!(
        r.error.as_deref().unwrap().contains("flip refused"),
        "{r:?}"
    );
    let notes: Vec<&str> = r.steps.iter().map(|s| s.note.as_str()).collect();
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("volume v1: lease flipped")),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("volume v1: lease rolled back")),
        "{notes:?}"
    );
    // The same VMM process runs the guest again; b's incoming VMM was ended.
    let i = h.a.instance("vm1").unwrap();
    assert_eq!(i.pid, started.pid);
    let b = h.b.instance("vm1").unwrap();
    assert_eq!(b.state, InstanceState::Stopped, "{b:?}");
    runs_only_on(&h, &h.a, &h.b).await;

    // Nothing is left behind that would stop the next migration.
    h.storage.refuse_v2.store(false, Ordering::SeqCst);
    let r = migrate(&h.a, "b").await;
    assert_eq!(r.phase, Phase::Completed, "{r:?}");
    runs_only_on(&h, &h.b, &h.a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_deactivated_on_a_volume_aborts_before_anything_moves() {
    if !kvm_available("a_destination_deactivated_on_a_volume_aborts_before_anything_moves") {
        return;
    }
    let h = hosts().await;
    // v1 was b's and went to a with a flip; b's deactivated lease was never released.
    let old = common::lease(&h.storage.nbd, "v1", "b", RequestedState::Primary).await;
    let new = common::lease(&h.storage.nbd, "v1", "a", RequestedState::Standby).await;
    let v1 = h.storage.reg.get("v1").unwrap();
    flip::flip(&h.storage.reg, &v1, Some("a"), FlipTrigger::Api)
        .await
        .unwrap();
    drop((old, new));
    assert_eq!(holder(&h, "v1", "b").await, Some(LeaseState::Deactivated));
    let started = h.a.run(common::guest(&h.kernel, &VOLUMES)).await.unwrap();

    let r = migrate(&h.a, "b").await;
    assert_eq!(r.phase, Phase::Aborted, "{r:?}");
    let err = r.error.as_deref().unwrap();
    assert!(err.contains("could not prepare"), "{err}");
    assert!(err.contains("deactivated"), "{err}");
    assert!(r.flipped.is_empty(), "{r:?}");
    let i = h.a.instance("vm1").unwrap();
    assert_eq!(i.pid, started.pid);
    assert_eq!(i.state, InstanceState::Running, "{i:?}");
    let info = h.a.vmm(&i).info().await.unwrap();
    assert_eq!(info.state, RunState::Running, "{info:?}");
    for v in VOLUMES {
        assert_eq!(holder(&h, v, "a").await, Some(LeaseState::Primary), "{v}");
    }
    assert_eq!(holder(&h, "v1", "b").await, Some(LeaseState::Deactivated));
    if let Ok(b) = h.b.instance("vm1") {
        assert!(b.state.is_terminal() && !b.vmm_alive(), "{b:?}");
    }
}
