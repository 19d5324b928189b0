//! Two hosts in this process with no test double: agents `a` and `b` (each serving its REST API
//! on loopback), the real `vmm` binary for every VMM, and a real storaged (in process, real NBD
//! lease connections, flips, rollbacks). The guest is a tiny PVH kernel that halts in a loop,
//! so a VMM starts at once and its migration stream is all the real protocol (memory, vCPU and
//! device state) without a Linux boot. Needs /dev/kvm and the workspace's binaries
//! (`cargo build --workspace --bins`).
//!
//! Every REST link can be cut ([`Link`]): each agent reaches storaged's API through a link of
//! its own, and the two agents reach each other through a third; the VMMs' NBD connections and
//! the migration stream are never cut. A [`SplitBrainWatch`] samples both VMMs and remembers if
//! the guest ever ran on both hosts at once.
// Each test binary compiles this module; migration_source.rs uses none of it.
#![allow(dead_code)]

use super::Storage;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use migrated::agent::Agent;
use migrated::api::MigrateRequest;
use migrated::config::{AgentConfig, AgentTls};
use migrated::instance::InstanceState;
use migrated::migration::record::{MigrationParams, MigrationRecord, Phase};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storaged_client::api::LeaseState;
use storaged_client::rest::StoragedApi;
use vmhop_common::tls_listener::{Peer, TlsListener};
use vmhop_common::token::Token;
use vmm_api::vm::RunState;

/// The guest's volumes.
pub const VOLUMES: [&str; 2] = ["v1", "v2"];
/// How long a test waits for anything.
pub const DEADLINE: Duration = Duration::from_secs(120);
/// How long an agent waits for its peer before it declares it lost.
pub const PEER_TIMEOUT_MS: u64 = 3000;

/// What a link does to the requests that cross it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Everything passes.
    None,
    /// Nothing passes: every request fails at once (503).
    All,
    /// Only reads (GET) pass; every other request fails at once.
    Writes,
    /// Every request reaches the server, but the answer to a flip is lost on its way back (as
    /// when the server crashes right after it committed).
    FlipAnswers,
}

#[derive(Clone, Copy)]
struct LinkState {
    cut: Cut,
    /// Requests whose path this accepts wait until it is lifted.
    hold: Option<fn(&str) -> bool>,
}

/// A REST link between two parties that a test can cut, hold or lose answers on.
#[derive(Clone)]
pub struct Link(Arc<tokio::sync::watch::Sender<LinkState>>);

impl Link {
    fn new() -> Link {
        Link(Arc::new(tokio::sync::watch::Sender::new(LinkState {
            cut: Cut::None,
            hold: None,
        })))
    }

    /// From now on, requests cross as `cut` says.
    pub fn cut(&self, cut: Cut) {
        self.0.send_modify(|s| s.cut = cut);
    }

    /// Requests whose path `which` accepts wait (until [`Link::release`]).
    pub fn hold(&self, which: fn(&str) -> bool) {
        self.0.send_modify(|s| s.hold = Some(which));
    }

    /// The held requests go on, as the link is cut then.
    pub fn release(&self) {
        self.0.send_modify(|s| s.hold = None);
    }

    /// `router` behind this link.
    fn serve(&self, router: Router) -> Router {
        router.layer(axum::middleware::from_fn_with_state(self.clone(), crossing))
    }
}

/// A request crossing a [`Link`].
async fn crossing(State(link): State<Link>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let mut rx = link.0.subscribe();
    let state = *rx
        .wait_for(|s| !s.hold.is_some_and(|held| held(&path)))
        .await
        .expect("the link outlives its requests");
    let lost = || (StatusCode::SERVICE_UNAVAILABLE, "link cut").into_response();
    match state.cut {
        Cut::None => next.run(req).await,
        Cut::All => lost(),
        Cut::Writes if req.method() == Method::GET => next.run(req).await,
        Cut::Writes => lost(),
        Cut::FlipAnswers if path.ends_with("/flip") => {
            let _ = next.run(req).await;
            lost()
        }
        Cut::FlipAnswers => next.run(req).await,
    }
}

/// The links between the parties.
pub struct Links {
    /// Agent a to storaged's API.
    pub storaged_a: Link,
    /// Agent b to storaged's API.
    pub storaged_b: Link,
    /// Between the agents, both ways.
    pub peers: Link,
}

impl Links {
    /// Every link passes everything again.
    pub fn heal(&self) {
        for l in [&self.storaged_a, &self.storaged_b, &self.peers] {
            l.cut(Cut::None);
            l.release();
        }
    }
}

/// Two agents, storaged and the links between them.
pub struct Hosts {
    /// Agent a (the guest starts here).
    pub a: Arc<Agent>,
    /// Agent b.
    pub b: Arc<Agent>,
    /// storaged.
    pub storage: Storage,
    /// The links a test may cut.
    pub links: Links,
    /// storaged's API, never cut.
    pub leases: StoragedApi,
    /// The guest's kernel.
    pub kernel: PathBuf,
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

/// Serves `router` on a fresh loopback port; returns its address.
async fn serve(router: Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(l, router).await });
    addr
}

/// How [`hosts_with`] sets the hosts up.
#[derive(Debug, Clone, Default)]
pub struct HostsOptions {
    /// TLS everywhere: a cluster CA and certificates for `storage`, `a`, `b` (and `c`, a host
    /// of the cluster that is neither, in `TLS_DIR/c`); storaged's NBD takes only TLS clients,
    /// the VMMs reach it and each other in TLS, and the agents serve and call in mutual TLS.
    pub tls: bool,
    /// Environment for the VMMs host b starts (its VMM binary is a wrapper that sets it).
    pub b_vmm_env: Vec<(String, String)>,
}

/// The TLS directory of `host` under the test's directory (see [`HostsOptions::tls`]).
pub fn tls_dir(h: &Hosts, host: &str) -> PathBuf {
    h._dir.path().join("pki").join(host)
}

/// Makes the cluster CA and the hosts' TLS directories under `dir`.
fn make_pki(dir: &std::path::Path) {
    use vmhop_common::pki::{create_ca, issue_host, HostCertRequest};
    let ca = dir.join("ca");
    create_ca(&ca, "test-cluster", 1).unwrap();
    for host in ["storage", "a", "b", "c"] {
        let req = HostCertRequest {
            host_id: host.into(),
            ips: vec!["127.0.0.1".parse().unwrap()],
            dns_names: vec![],
            days: 1,
        };
        issue_host(&ca, &req, &dir.join(host)).unwrap();
    }
}

/// A shell script that runs the real `vmm` with `env` set.
fn vmm_wrapper(path: &std::path::Path, env: &[(String, String)]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let mut text = String::from("#!/bin/sh\n");
    for (k, v) in env {
        text.push_str(&format!("export {k}='{v}'\n"));
    }
    text.push_str(&format!("exec '{}' \"$@\"\n", e2e::binary("vmm").display()));
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_path_buf()
}

/// Starts storaged with [`VOLUMES`] and the two agents, every link up.
pub async fn hosts() -> Hosts {
    hosts_with(HostsOptions::default()).await
}

/// [`hosts`] set up as `opts` says.
pub async fn hosts_with(opts: HostsOptions) -> Hosts {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let nbd_tls = opts.tls.then(|| {
        make_pki(&pki);
        let storage = vmhop_common::tls::HostTls::load(&pki.join("storage")).unwrap();
        storaged::server::NbdTls::new(&storage, false).unwrap()
    });
    let storage = super::storage_with_tls(
        &dir.path().join("storaged"),
        &VOLUMES,
        |_| Router::new(),
        nbd_tls,
    )
    .await;
    let links = Links {
        storaged_a: Link::new(),
        storaged_b: Link::new(),
        peers: Link::new(),
    };
    let storaged_api = [
        serve(links.storaged_a.serve(storage.router.clone())).await,
        serve(links.storaged_b.serve(storage.router.clone())).await,
    ];
    let la = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr_a, addr_b) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    // The two hosts share a token: every peer call below is authenticated.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "real-vmm-test-cluster-secret\n").unwrap();
    let token = Token::load(&token_file).unwrap();
    let b_vmm = vmm_wrapper(&dir.path().join("vmm-b"), &opts.b_vmm_env);
    let cfg = |me: &str, listen: std::net::SocketAddr, peer: &str, peer_addr: String| AgentConfig {
        vmm_binary: if me == "b" {
            b_vmm.clone()
        } else {
            e2e::binary("vmm")
        },
        tls_dir: opts.tls.then(|| pki.join(me)),
        tls: opts.tls.then(|| AgentTls::load(&pki.join(me), me).unwrap()),
        storaged_name: opts.tls.then(|| "storage".to_string()),
        host_id: me.into(),
        state_dir: dir.path().join(me).join("state"),
        listen,
        socket: dir.path().join(me).join("m.sock"),
        storaged_api: storaged_api[usize::from(me == "b")].clone(),
        storaged_nbd: storage.nbd.clone(),
        vhost_user_binary: e2e::binary("vmm").with_file_name("vhost-user-blk"),
        migration_ip: "127.0.0.1".parse().unwrap(),
        peer_timeout_ms: PEER_TIMEOUT_MS,
        peers: [(peer.to_string(), peer_addr)].into_iter().collect(),
        ready_file: None,
        token: Some(token.clone()),
        storaged_token: None,
        storaged_token_file: None,
        log_json: false,
    };
    let a = Agent::open(cfg("a", addr_a, "b", addr_b.to_string())).unwrap();
    let b = Agent::open(cfg("b", addr_b, "a", addr_a.to_string())).unwrap();
    for (l, agent) in [(la, &a), (lb, &b)] {
        let r = links
            .peers
            .serve(migrated::server::tcp_router(agent.clone()));
        match &agent.cfg.tls {
            None => {
                tokio::spawn(async move { axum::serve(l, r).await });
            }
            Some(tls) => {
                let l = TlsListener::new(l, tls.server.clone()).unwrap();
                let service = r.into_make_service_with_connect_info::<Peer>();
                tokio::spawn(async move { axum::serve(l, service).await });
            }
        }
    }
    let kernel = e2e::tiny::hlt_kernel(dir.path()).unwrap();
    Hosts {
        a,
        b,
        leases: StoragedApi::new(&storage.api, None),
        storage,
        links,
        kernel,
        _dir: dir,
    }
}

impl Hosts {
    /// Runs the guest on a.
    pub async fn guest_on_a(&self) -> migrated::instance::InstanceRecord {
        self.a
            .run(super::guest(&self.kernel, &VOLUMES))
            .await
            .unwrap()
    }

    /// The state `host` holds on volume `v`.
    pub async fn holder(&self, v: &str, host: &str) -> Option<LeaseState> {
        self.leases.state_of(v, host).await.unwrap()
    }

    /// The guest runs on `on` only: its VMM there answers `running`, nothing runs on `off`, and
    /// `on` holds every volume alone.
    pub async fn runs_only_on(&self, on: &Arc<Agent>, off: &Arc<Agent>) {
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
                self.holder(v, &on.cfg.host_id).await,
                Some(LeaseState::Primary),
                "{v}"
            );
            assert_eq!(self.holder(v, &off.cfg.host_id).await, None, "{v}");
        }
    }
}

/// Starts migrating vm1 from `from` to `to`; returns the migration's id.
pub async fn start_migration(from: &Arc<Agent>, to: &str) -> String {
    migrated::migration::source::start(
        from,
        "vm1",
        MigrateRequest {
            to: to.into(),
            params: MigrationParams::default(),
        },
    )
    .await
    .unwrap()
    .id
}

/// Waits until `agent`'s record of migration `id` is in a phase `done` accepts.
pub async fn wait_phase(
    agent: &Arc<Agent>,
    id: &str,
    done: impl Fn(Phase) -> bool,
) -> MigrationRecord {
    let t = Instant::now();
    loop {
        if let Ok(r) = agent.migration(id) {
            if done(r.phase) {
                return r;
            }
            assert!(t.elapsed() < DEADLINE, "migration stuck: {r:?}");
        }
        assert!(t.elapsed() < DEADLINE, "no migration {id} here");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Migrates vm1 from `from` to `to` and waits for the end.
pub async fn migrate(from: &Arc<Agent>, to: &str) -> MigrationRecord {
    let id = start_migration(from, to).await;
    wait_phase(from, &id, Phase::is_terminal).await
}

/// Whether `agent`'s VMM of vm1 runs the guest right now.
async fn runs_on(agent: &Agent) -> bool {
    let Ok(i) = agent.instance("vm1") else {
        return false;
    };
    if !i.vmm_alive() {
        return false;
    }
    let vmm = agent.vmm(&i).with_timeout(Duration::from_millis(500));
    matches!(vmm.info().await, Ok(info) if info.state == RunState::Running)
}

/// Samples both VMMs of vm1 until dropped and remembers whether both ever ran the guest.
pub struct SplitBrainWatch {
    both: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl SplitBrainWatch {
    /// Starts sampling every 20 ms.
    pub fn start(h: &Hosts) -> SplitBrainWatch {
        let both = Arc::new(AtomicBool::new(false));
        let (a, b, flag) = (h.a.clone(), h.b.clone(), both.clone());
        let task = tokio::spawn(async move {
            loop {
                let (on_a, on_b) = tokio::join!(runs_on(&a), runs_on(&b));
                if on_a && on_b {
                    flag.store(true, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        SplitBrainWatch { both, task }
    }

    /// Whether the guest ran on both hosts at some sample.
    pub fn ran_on_both(&self) -> bool {
        self.both.load(Ordering::SeqCst)
    }
}

impl Drop for SplitBrainWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
