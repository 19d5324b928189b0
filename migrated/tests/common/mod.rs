//! What migrated's integration tests share: an in-process storaged (NBD listener and REST API
//! on ephemeral 127.0.0.1 ports) with small volumes, stopped when dropped; lease connections to
//! it; the test guest `vm1` on its volumes; and ([`hosts`]) two agents with the real VMM whose
//! links to each other and to storaged a test can cut.

pub mod hosts;

use axum::Router;
use migrated::config::{DiskSpec, InstanceConfig};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use storaged::registry::Registry;
use storaged_client::api::VolumeConfig;
use storaged_client::nbd::{Client, ClientConfig, LeaseSpec};
use storaged_client::protocol::RequestedState;

/// A running in-process storaged.
pub struct Storage {
    /// REST API address.
    pub api: String,
    /// NBD address.
    pub nbd: String,
    /// Its volumes (real_vmm.rs flips through them; migration_source.rs does not, and each test
    /// binary compiles this module on its own).
    #[allow(dead_code)]
    pub reg: Arc<Registry>,
    /// Its REST API's routes, to serve again behind a link a test can cut ([`hosts`]).
    #[allow(dead_code)]
    pub router: Router,
    _stop: tokio::sync::watch::Sender<bool>,
}

/// Starts storaged with its data in `dir` and 1 MiB `volumes`; the routes `extra` builds go in
/// front of the REST API (to stand in for one of its endpoints).
#[allow(dead_code)]
pub async fn storage(
    dir: &Path,
    volumes: &[&str],
    extra: impl FnOnce(Arc<Registry>) -> Router,
) -> Storage {
    storage_with_tls(dir, volumes, extra, None).await
}

/// [`storage`] whose NBD port takes only TLS clients (loopback too) when `tls` is given.
pub async fn storage_with_tls(
    dir: &Path,
    volumes: &[&str],
    extra: impl FnOnce(Arc<Registry>) -> Router,
    tls: Option<storaged::server::NbdTls>,
) -> Storage {
    let reg = Arc::new(Registry::open(dir).unwrap());
    for v in volumes {
        reg.create(VolumeConfig::new(*v, 1 << 20)).await.unwrap();
    }
    let nbd = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let router = extra(reg.clone()).merge(storaged::api::router(reg.clone()));
    let s = Storage {
        api: api.local_addr().unwrap().to_string(),
        nbd: nbd.local_addr().unwrap().to_string(),
        reg: reg.clone(),
        router: router.clone(),
        _stop: tx,
    };
    tokio::spawn(storaged::server::run(
        nbd,
        reg.clone(),
        tls,
        rx,
        Duration::from_secs(1),
    ));
    tokio::spawn(async move { axum::serve(api, router).await });
    s
}

/// A connection to `volume` at the storaged NBD address `nbd` holding a `state` lease for
/// instance `vm1` on `host` (as a VMM's disk would); the lease goes when it is dropped.
#[allow(dead_code)]
pub async fn lease(nbd: &str, volume: &str, host: &str, state: RequestedState) -> Client {
    let cfg = ClientConfig::new(vec![nbd.to_string()], volume).with_lease(LeaseSpec {
        host: host.into(),
        instance: "vm1".into(),
        state,
        expected_epoch: 0,
    });
    Client::connect(&cfg).await.unwrap()
}

/// The test instance `vm1`: `kernel`, 64 MiB, one vCPU, a read-write disk on each of `volumes`.
pub fn guest(kernel: &Path, volumes: &[&str]) -> InstanceConfig {
    InstanceConfig {
        name: "vm1".into(),
        kernel: kernel.to_path_buf(),
        cmdline: String::new(),
        memory_mib: 64,
        vcpus: 1,
        disks: volumes
            .iter()
            .map(|v| DiskSpec {
                volume: Some(v.to_string()),
                path: None,
                read_only: false,
                backend: Default::default(),
            })
            .collect(),
        restore: None,
    }
}
