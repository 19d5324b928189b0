//! The source-side state machine against a real storaged (in process, real NBD lease
//! connections, real flips and rollbacks) with the two parties replaced by
//! test doubles that follow the contract: a VMM API on a Unix socket that pretends to stream
//! (`vmm_client`'s contract), and a destination migrated on TCP whose incoming VMM holds
//! standby leases. The `VMM process` is a `sleep` child that the double's shutdown ends.
//!
//! Covered: a migration that completes (every lease flips, the destination resumes, the
//! source ends); a group flip storaged refuses (nothing moves, the destination's standby leases
//! are revoked, the source resumes); a destination lost during pre-copy; a stream the source VMM
//! reports failed; restarts of the source's migrated in the middle of the flip (a guest split
//! between the hosts by an earlier per-volume flip is rolled back, naming each flip).
//!
//! The doubles make the timing of each phase the test's to choose (a pre-copy that lasts, a
//! restart between two flips) and record every call made to them. The same paths with the
//! real `vmm` are in `real_vmm.rs` (completion, a refused flip) and, with real guests on
//! namespaced hosts, in the end-to-end tests (`tests/tests/migrated_*.rs`).

mod common;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use migrated::agent::Agent;
use migrated::api::{IncomingReady, MigrateRequest};
use migrated::config::AgentConfig;
use migrated::instance::{proc_start_time, InstanceRecord, InstanceState};
use migrated::migration::record::{Figures, MigrationParams, MigrationRecord, Phase, Role};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use storaged_client::api::LeaseState;
use storaged_client::nbd::Client;
use storaged_client::protocol::RequestedState;
use storaged_client::rest::StoragedApi;

const VOLUMES: [&str; 2] = ["v1", "v2"];

/// How the VMM double's stream ends.
#[derive(Clone, Copy)]
enum Stream {
    HandOverAfter(u32),
    FailAfter(u32),
}

struct FakeVmm {
    phase: String,
    state: String,
    polls: u32,
    stream: Stream,
    calls: Vec<String>,
    child: Option<std::process::Child>,
    _disks: Vec<Client>,
}

impl FakeVmm {
    /// Ends the `VMM process`, if it still runs.
    fn end_process(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for FakeVmm {
    fn drop(&mut self) {
        // A source that resumed still has its `VMM process`: end it with the test.
        self.end_process();
    }
}

type Vmm = Arc<Mutex<FakeVmm>>;

/// Locks the VMM double and records a call to `what`.
fn called(v: &Vmm, what: String) -> MutexGuard<'_, FakeVmm> {
    let mut v = v.lock().unwrap();
    v.calls.push(what);
    v
}

fn vmm_router(vmm: Vmm) -> Router {
    async fn info(State(v): State<Vmm>) -> Json<Value> {
        let v = v.lock().unwrap();
        Json(json!({"state": v.state, "pid": 1}))
    }
    async fn resume(State(v): State<Vmm>) -> Json<Value> {
        let mut v = called(&v, "resume".into());
        v.state = "running".into();
        Json(json!({"state": "running"}))
    }
    async fn shutdown(State(v): State<Vmm>) -> Json<Value> {
        let mut v = called(&v, "shutdown".into());
        v.end_process();
        Json(json!({"state": "paused"}))
    }
    async fn send(
        State(v): State<Vmm>,
        Json(body): Json<Value>,
    ) -> (axum::http::StatusCode, Json<Value>) {
        let mut v = called(&v, format!("send {body}"));
        v.phase = "precopy".into();
        (axum::http::StatusCode::ACCEPTED, Json(json!({})))
    }
    async fn status(State(v): State<Vmm>) -> Json<Value> {
        let mut v = v.lock().unwrap();
        let mut error = Value::Null;
        if v.phase == "precopy" {
            v.polls += 1;
            match v.stream {
                Stream::HandOverAfter(n) if v.polls >= n => {
                    v.phase = "handed-over".into();
                    v.state = "paused".into();
                }
                Stream::FailAfter(n) if v.polls >= n => v.phase = "failed".into(),
                _ => {}
            }
        }
        if v.phase == "failed" {
            error = json!("boom");
        }
        Json(json!({
            "phase": v.phase, "iteration": v.polls, "bytes_sent": 4096 * v.polls as u64,
            "bytes_remaining": 4096, "dirty_rate_bytes_per_sec": 1000,
            "expected_downtime_ms": 3, "total_ms": 10, "downtime_ms": 2, "error": error
        }))
    }
    async fn abort(State(v): State<Vmm>) -> Json<Value> {
        let mut v = called(&v, "abort".into());
        v.phase = "aborted".into();
        v.state = "running".into();
        Json(json!({}))
    }
    Router::new()
        .route("/v1/vm", get(info))
        .route("/v1/vm/resume", post(resume))
        .route("/v1/vm/shutdown", post(shutdown))
        .route("/v1/migration/send", post(send))
        .route("/v1/migration", get(status))
        .route("/v1/migration/abort", post(abort))
        .with_state(vmm)
}

/// The record of a migration `id` of vm1 from a to b, as `role` keeps it: created, nothing done
/// yet, the destination VMM's stream at 127.0.0.1:1; no peer address, no volumes, started at 0.
fn a_to_b(id: &str, role: Role) -> MigrationRecord {
    MigrationRecord {
        id: id.into(),
        instance: "vm1".into(),
        role,
        source: "a".into(),
        destination: "b".into(),
        peer_addr: String::new(),
        params: MigrationParams::default(),
        phase: Phase::Created,
        stream_addr: Some("127.0.0.1:1".into()),
        volumes: vec![],
        flipped: vec![],
        epochs: Default::default(),
        steps: vec![],
        started_ms: 0,
        ended_ms: None,
        error: None,
        figures: Figures::default(),
    }
}

struct FakePeer {
    storage_nbd: String,
    standby_for: Vec<&'static str>,
    record: Option<MigrationRecord>,
    calls: Vec<String>,
    disks: Vec<Client>,
}

type Peer = Arc<tokio::sync::Mutex<FakePeer>>;

fn peer_router(peer: Peer) -> Router {
    async fn host() -> Json<Value> {
        Json(json!({"host_id": "b", "listen": "x", "version": "t",
            "active_instances": 0, "active_migrations": 0}))
    }
    async fn prepare(State(p): State<Peer>, Json(req): Json<Value>) -> Json<IncomingReady> {
        let mut p = p.lock().await;
        p.calls.push("prepare".into());
        for v in p.standby_for.clone() {
            let c = common::lease(&p.storage_nbd, v, "b", RequestedState::Standby).await;
            p.disks.push(c);
        }
        p.record = Some(MigrationRecord {
            peer_addr: "x".into(),
            phase: Phase::Precopy,
            ..a_to_b(req["migration"].as_str().unwrap(), Role::Destination)
        });
        Json(IncomingReady {
            host: "b".into(),
            stream_addr: "127.0.0.1:1".into(),
        })
    }
    async fn show(State(p): State<Peer>) -> Json<Value> {
        let p = p.lock().await;
        Json(serde_json::to_value(&p.record).unwrap())
    }
    async fn act(p: &Peer, what: &str, phase: Phase) -> Json<Value> {
        let mut p = p.lock().await;
        p.calls.push(what.into());
        if let Some(r) = &mut p.record {
            r.phase = phase;
        }
        Json(serde_json::to_value(&p.record).unwrap())
    }
    async fn resume(State(p): State<Peer>) -> Json<Value> {
        act(&p, "resume", Phase::Completed).await
    }
    async fn abort(State(p): State<Peer>) -> Json<Value> {
        act(&p, "abort", Phase::Aborted).await
    }
    Router::new()
        .route("/v1/host", get(host))
        .route("/v1/incoming", post(prepare))
        .route("/v1/incoming/{id}", get(show))
        .route("/v1/incoming/{id}/resume", post(resume))
        .route("/v1/incoming/{id}/abort", post(abort))
        .with_state(peer)
}

struct Setup {
    agent: Arc<Agent>,
    vmm: Vmm,
    peer: Peer,
    peer_task: tokio::task::JoinHandle<()>,
    leases: StoragedApi,
    _storage: common::Storage,
    _dir: tempfile::TempDir,
}

async fn setup(stream: Stream, standby_for: Vec<&'static str>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let storage = common::storage(&dir.path().join("storaged"), &VOLUMES, |_| Router::new()).await;
    let mut disks = Vec::new();
    for v in VOLUMES {
        disks.push(common::lease(&storage.nbd, v, "a", RequestedState::Primary).await);
    }
    let child = std::process::Command::new("sleep")
        .arg("600")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let vmm = Arc::new(Mutex::new(FakeVmm {
        phase: "idle".into(),
        state: "running".into(),
        polls: 0,
        stream,
        calls: vec![],
        child: Some(child),
        _disks: disks,
    }));
    let sock = dir.path().join("api.sock");
    let l = tokio::net::UnixListener::bind(&sock).unwrap();
    let r = vmm_router(vmm.clone());
    tokio::spawn(async move { axum::serve(l, r).await });

    let peer = Arc::new(tokio::sync::Mutex::new(FakePeer {
        storage_nbd: storage.nbd.clone(),
        standby_for,
        record: None,
        calls: vec![],
        disks: vec![],
    }));
    let pl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = pl.local_addr().unwrap().to_string();
    let r = peer_router(peer.clone());
    let peer_task = tokio::spawn(async move {
        let _ = axum::serve(pl, r).await;
    });

    let cfg = AgentConfig {
        host_id: "a".into(),
        state_dir: dir.path().join("state"),
        listen: "127.0.0.1:7070".parse().unwrap(),
        socket: dir.path().join("m.sock"),
        storaged_api: storage.api.clone(),
        storaged_nbd: storage.nbd.clone(),
        vmm_binary: "/nonexistent".into(),
        vhost_user_binary: "/nonexistent".into(),
        migration_ip: "127.0.0.1".parse().unwrap(),
        peer_timeout_ms: 500,
        peers: [("b".to_string(), peer_addr)].into_iter().collect(),
        ready_file: None,
        token: None,
        storaged_token: None,
        storaged_token_file: None,
        log_json: false,
        tls_dir: None,
        tls: None,
        storaged_name: None,
    };
    let agent = Agent::open(cfg).unwrap();
    let mut rec = InstanceRecord::new(
        common::guest(Path::new("/k"), &VOLUMES),
        &dir.path().join("state"),
        InstanceState::Running,
    );
    rec.api_socket = sock;
    rec.pid = Some(pid);
    rec.pid_start = proc_start_time(pid);
    agent.put_instance(rec).await.unwrap();
    Setup {
        agent,
        vmm,
        peer,
        peer_task,
        leases: StoragedApi::new(&storage.api, None),
        _storage: storage,
        _dir: dir,
    }
}

async fn wait_phase(s: &Setup, id: &str, done: impl Fn(Phase) -> bool) -> MigrationRecord {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = s.agent.migration(id).unwrap();
        if done(r.phase) {
            return r;
        }
        assert!(Instant::now() < deadline, "stuck: {r:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn start(s: &Setup) -> String {
    migrated::migration::source::start(
        &s.agent,
        "vm1",
        MigrateRequest {
            to: "b".into(),
            params: MigrationParams {
                downtime_ms: 50,
                max_iterations: 5,
                throttle: true,
            },
        },
    )
    .await
    .unwrap()
    .id
}

async fn holder(s: &Setup, v: &str, host: &str) -> Option<LeaseState> {
    s.leases.state_of(v, host).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_flips_every_lease_resumes_the_destination_and_ends_the_source() {
    let s = setup(Stream::HandOverAfter(3), VOLUMES.to_vec()).await;
    let id = start(&s).await;
    let r = wait_phase(&s, &id, Phase::is_terminal).await;
    assert_eq!(r.phase, Phase::Completed, "{r:?}");
    assert_eq!(r.flipped, VOLUMES.to_vec());
    let phases: Vec<Phase> = r.steps.iter().map(|s| s.phase).collect();
    let mut seen = phases.clone();
    seen.dedup();
    assert_eq!(
        seen,
        vec![
            Phase::Created,
            Phase::Preparing,
            Phase::Precopy,
            Phase::HandedOver,
            Phase::Flipping,
            Phase::Flipped,
            Phase::Resuming,
            Phase::Cleanup,
            Phase::Completed
        ]
    );
    assert_eq!(r.figures.bytes_sent, 4096 * 3);
    assert!(r.figures.total_ms >= r.figures.downtime_ms);
    for v in VOLUMES {
        assert_eq!(holder(&s, v, "b").await, Some(LeaseState::Primary));
        // Deactivated by the flip, released at cleanup once the source VMM was gone.
        assert_eq!(holder(&s, v, "a").await, None);
    }
    assert!(
        r.steps
            .iter()
            .any(|s| s.note == "volume v2: deactivated lease of a released"),
        "{r:?}"
    );
    let calls = s.vmm.lock().unwrap().calls.clone();
    assert!(
        calls[0].contains("\"destination\":\"127.0.0.1:1\""),
        "{calls:?}"
    );
    assert!(calls[0].contains("\"resume\":\"wait\""), "{calls:?}");
    assert!(calls[0].contains("\"downtime_limit_ms\":50"), "{calls:?}");
    assert_eq!(calls.last().map(String::as_str), Some("shutdown"));
    assert!(
        !calls.contains(&"resume".to_string()),
        "the source resumed: {calls:?}"
    );
    assert_eq!(s.peer.lock().await.calls, vec!["prepare", "resume"]);
    let inst = s.agent.instance("vm1").unwrap();
    assert_eq!(inst.state, InstanceState::MigratedAway);
    assert!(!inst.vmm_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_flip_moves_nothing_and_the_source_resumes() {
    // The destination holds a standby lease on v1 only: storaged refuses the group flip.
    let s = setup(Stream::HandOverAfter(2), vec!["v1"]).await;
    let id = start(&s).await;
    let r = wait_phase(&s, &id, Phase::is_terminal).await;
    assert_eq!(r.phase, Phase::Aborted, "{r:?}");
    assert!(
        r.error.as_deref().unwrap().contains("flip refused"),
        "{r:?}"
    );
    assert!(r.flipped.is_empty());
    assert!(
        r.steps
            .iter()
            .any(|s| s.note.contains("its standby leases ended")),
        "{r:?}"
    );
    for v in VOLUMES {
        assert_eq!(holder(&s, v, "a").await, Some(LeaseState::Primary), "{v}");
        assert_eq!(
            holder(&s, v, "b").await,
            None,
            "{v}: the destination kept a lease"
        );
    }
    let calls = s.vmm.lock().unwrap().calls.clone();
    assert!(
        calls.ends_with(&["abort".to_string(), "resume".to_string()]),
        "{calls:?}"
    );
    assert_eq!(s.peer.lock().await.calls, vec!["prepare", "abort"]);
    let inst = s.agent.instance("vm1").unwrap();
    assert_eq!(inst.state, InstanceState::Running);
    assert_eq!(inst.migration, None);
    assert!(inst.vmm_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_lost_during_precopy_aborts_and_the_source_resumes() {
    let s = setup(Stream::HandOverAfter(u32::MAX), VOLUMES.to_vec()).await;
    let id = start(&s).await;
    wait_phase(&s, &id, |p| p == Phase::Precopy).await;
    s.peer_task.abort();
    let r = wait_phase(&s, &id, Phase::is_terminal).await;
    assert_eq!(r.phase, Phase::Aborted, "{r:?}");
    assert!(
        r.error.as_deref().unwrap().contains("lost before the flip"),
        "{r:?}"
    );
    let calls = s.vmm.lock().unwrap().calls.clone();
    assert!(
        calls.ends_with(&["abort".to_string(), "resume".to_string()]),
        "{calls:?}"
    );
    for v in VOLUMES {
        assert_eq!(holder(&s, v, "a").await, Some(LeaseState::Primary));
    }
    assert_eq!(
        s.agent.instance("vm1").unwrap().state,
        InstanceState::Running
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_stream_aborts_and_a_second_migration_can_follow() {
    let s = setup(Stream::FailAfter(2), VOLUMES.to_vec()).await;
    let id = start(&s).await;
    let r = wait_phase(&s, &id, Phase::is_terminal).await;
    assert_eq!(r.phase, Phase::Aborted, "{r:?}");
    assert!(
        r.error.as_deref().unwrap().contains("failed: boom"),
        "{r:?}"
    );
    assert_eq!(s.peer.lock().await.calls, vec!["prepare", "abort"]);
    assert_eq!(
        s.agent.instance("vm1").unwrap().state,
        InstanceState::Running
    );
    // A second request while none runs is accepted; two at once are not.
    s.vmm.lock().unwrap().stream = Stream::HandOverAfter(u32::MAX);
    let id2 = start(&s).await;
    assert_ne!(id, id2);
    let again = migrated::migration::source::start(
        &s.agent,
        "vm1",
        MigrateRequest {
            to: "b".into(),
            params: MigrationParams::default(),
        },
    )
    .await;
    assert!(again.is_err());
}

/// Records a migration as if migrated had died in `phase` after flipping `flipped` at
/// storaged, and starts a fresh agent on the same state directory.
async fn restarted_in(mut s: Setup, phase: Phase, flipped: &[&str]) -> (Setup, String) {
    let mut standby = Vec::new();
    for v in VOLUMES {
        standby.push(common::lease(&s._storage.nbd, v, "b", RequestedState::Standby).await);
    }
    s.peer.lock().await.disks = standby;
    let id = "vm1.a.1".to_string();
    let inst = s
        .agent
        .update_instance("vm1", |r| {
            r.state = InstanceState::Migrating;
            r.migration = Some(id.clone());
        })
        .await
        .unwrap();
    assert!(inst.vmm_alive());
    let mut rec = MigrationRecord {
        peer_addr: s.agent.cfg.peers["b"].clone(),
        volumes: VOLUMES.iter().map(|v| v.to_string()).collect(),
        started_ms: migrated::now_ms(),
        ..a_to_b(&id, Role::Source)
    };
    rec.step(phase, "recorded before the crash");
    let mut at_destination = rec.clone();
    at_destination.role = Role::Destination;
    at_destination.phase = Phase::Precopy;
    s.peer.lock().await.record = Some(at_destination);
    s.agent.put_migration(rec).await.unwrap();
    for v in flipped {
        s.leases.flip_to(v, "b").await.unwrap();
    }
    let cfg = s.agent.cfg.clone();
    // The old agent holds the state database open: it goes before the new one opens it.
    drop(s.agent);
    s.agent = Agent::open(cfg).unwrap();
    migrated::recovery::recover(&s.agent).await.unwrap();
    (s, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_the_middle_of_the_flips_rolls_back_and_resumes_the_source() {
    let s = setup(Stream::HandOverAfter(u32::MAX), vec![]).await;
    let (s, id) = restarted_in(s, Phase::Flipping, &["v1"]).await;
    let r = wait_phase(&s, &id, Phase::is_terminal).await;
    assert_eq!(r.phase, Phase::Aborted, "{r:?}");
    assert!(
        r.error.as_deref().unwrap().contains("migrated restarted"),
        "{r:?}"
    );
    for v in VOLUMES {
        assert_eq!(holder(&s, v, "a").await, Some(LeaseState::Primary), "{v}");
        assert_eq!(holder(&s, v, "b").await, None, "{v}");
    }
    let calls = s.vmm.lock().unwrap().calls.clone();
    assert!(
        calls.ends_with(&["abort".to_string(), "resume".to_string()]),
        "{calls:?}"
    );
    let inst = s.agent.instance("vm1").unwrap();
    assert_eq!(inst.state, InstanceState::Running);
    assert!(inst.vmm_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_every_flip_completes_on_the_destination() {
    let s = setup(Stream::HandOverAfter(u32::MAX), vec![]).await;
    let (s, id) = restarted_in(s, Phase::Flipping, &VOLUMES).await;
    let r = wait_phase(&s, &id, Phase::is_terminal).await;
    assert_eq!(r.phase, Phase::Completed, "{r:?}");
    assert_eq!(r.flipped, VOLUMES.to_vec());
    assert_eq!(s.peer.lock().await.calls, vec!["resume"]);
    let calls = s.vmm.lock().unwrap().calls.clone();
    assert_eq!(calls, vec!["shutdown"], "the source must not resume");
    assert_eq!(
        s.agent.instance("vm1").unwrap().state,
        InstanceState::MigratedAway
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_precopy_aborts_and_resumes_the_source() {
    let s = setup(Stream::HandOverAfter(u32::MAX), vec![]).await;
    let (s, id) = restarted_in(s, Phase::Precopy, &[]).await;
    let r = wait_phase(&s, &id, Phase::is_terminal).await;
    assert_eq!(r.phase, Phase::Aborted, "{r:?}");
    assert_eq!(s.peer.lock().await.calls, vec!["abort"]);
    for v in VOLUMES {
        assert_eq!(holder(&s, v, "b").await, None, "{v}");
    }
    assert_eq!(
        s.agent.instance("vm1").unwrap().state,
        InstanceState::Running
    );
}
