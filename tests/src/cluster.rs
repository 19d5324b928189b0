//! A storaged cluster for the cluster-mode tests: a real etcd and several `storaged serve
//! --etcd` nodes on loopback ports (optionally with TLS host identities for everything), the
//! volume's view from any node, and a writer of numbered records whose acknowledged writes are
//! verified afterwards.

use crate::etcd::Etcd;
use crate::netns::Host;
use crate::pki::Pki;
use crate::process::wait_for_async;
use crate::storaged::Storaged;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storaged_client::cluster::ReplicatedVolumeView;
use storaged_client::nbd::{ClientConfig, ClientTls, FailoverClient, LeaseSpec};
use storaged_client::protocol::RequestedState;
use storaged_client::rest::StoragedApi;
use vmhop_common::token::Token;

/// TTL of the nodes' etcd leases (seconds): a dead master's mastership ends within it.
pub const LEASE_TTL_SECS: &str = "2";

/// One storaged node of the cluster.
pub struct Node {
    /// Its id (with TLS, its certificate's host id).
    pub id: String,
    /// The process.
    pub storaged: Storaged,
    flags: Vec<String>,
    /// The replication listener's address (kept across restarts).
    pub repl: String,
}

/// etcd and the storaged nodes.
pub struct Cluster {
    /// The test's directory.
    pub dir: PathBuf,
    /// etcd (one member or several).
    pub etcd: Etcd,
    /// The nodes, in the order given.
    pub nodes: Vec<Node>,
    /// The CA of the nodes and clients, with TLS.
    pub pki: Option<Pki>,
    /// The test hosts (network namespaces) that nodes run in, by node id; the others run
    /// here, on loopback.
    homes: std::collections::HashMap<String, Host>,
    /// The token the nodes' REST APIs require (`--api-token-file`), if they require one.
    api_token: Option<(PathBuf, Token)>,
}

/// A free loopback address (bound and released).
fn free_addr() -> Result<String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string())
}

impl Cluster {
    /// Starts etcd and one node per id in `dir`. With `tls`, every node has a host certificate
    /// of one CA, requires TLS from every NBD client (loopback too) and replicates in mutual
    /// TLS; node ids are the certificates' host ids.
    pub fn start(dir: &Path, ids: &[&str], tls: bool) -> Result<Cluster> {
        Self::start_on(Etcd::start(dir)?, dir, ids, tls)
    }

    /// [`Cluster::start`] on a running `etcd` (several members, say).
    pub fn start_on(etcd: Etcd, dir: &Path, ids: &[&str], tls: bool) -> Result<Cluster> {
        let pki = tls.then(|| Pki::new(dir, "cluster-ca")).transpose()?;
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            etcd,
            nodes: Vec::new(),
            pki,
            homes: Default::default(),
            api_token: None,
        };
        for id in ids {
            c.add_node(id, &[])?;
        }
        Ok(c)
    }

    /// etcd and nodes `node-a` and `node-b`, both started with `env` (fault points: either
    /// may win the election), and volume `rv` of `size` placed on both.
    pub fn pair_with_env(dir: &Path, env: &[(&str, &str)], size: &str) -> Result<Cluster> {
        let mut c = Cluster::start(dir, &[], false)?;
        c.add_node_with_env("node-a", env)?;
        c.add_node_with_env("node-b", env)?;
        c.node("node-a")
            .storaged
            .create_volume("rv", size, &["--replicas", "2"])?;
        Ok(c)
    }

    /// Starts one more node, with extra `serve` flags.
    pub fn add_node(&mut self, id: &str, extra: &[&str]) -> Result<&Node> {
        let node = self.spawn(id, extra, &[])?;
        self.nodes.push(node);
        Ok(self.nodes.last().expect("just pushed"))
    }

    /// Makes the nodes started from now on require the token in `file` on their REST APIs;
    /// the fixture's own REST calls carry it.
    pub fn require_api_token(&mut self, file: &Path) -> Result<()> {
        self.api_token = Some((file.to_path_buf(), Token::load(file)?));
        Ok(())
    }

    /// Starts one more node inside test host `host` (its namespace, listening on its
    /// address; with TLS, its certificate is valid for that address too).
    pub fn add_node_in(&mut self, id: &str, host: &Host) -> Result<&Node> {
        self.homes.insert(id.to_string(), host.clone());
        self.add_node(id, &[])
    }

    /// Starts one more node with environment variables (fault points).
    pub fn add_node_with_env(&mut self, id: &str, env: &[(&str, &str)]) -> Result<&Node> {
        let node = self.spawn(id, &[], env)?;
        self.nodes.push(node);
        Ok(self.nodes.last().expect("just pushed"))
    }

    fn spawn(&self, id: &str, extra: &[&str], env: &[(&str, &str)]) -> Result<Node> {
        let work = self.dir.join(id);
        std::fs::create_dir_all(&work)?;
        let home = self.homes.get(id);
        let repl = match home {
            // A namespace of the rig has nothing bound: any free port number will do.
            Some(h) => format!(
                "{}:{}",
                h.addr,
                free_addr()?.rsplit_once(':').expect("port").1
            ),
            None => free_addr()?,
        };
        let mut flags: Vec<String> = [
            "--etcd",
            &self.etcd.endpoint,
            "--repl-listen",
            &repl,
            "--etcd-lease-ttl-secs",
            LEASE_TTL_SECS,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        match &self.pki {
            None => flags.extend(["--node-id".to_string(), id.to_string()]),
            Some(pki) => {
                let tls = match home {
                    // Clients on other hosts check the address they reach the node at.
                    Some(h) => pki.host_at(id, &[h.addr.into()])?,
                    None => pki.host(id)?,
                };
                flags.extend([
                    "--tls-dir".to_string(),
                    tls.display().to_string(),
                    "--no-plaintext-loopback".to_string(),
                ]);
            }
        }
        if let Some((file, _)) = &self.api_token {
            flags.extend(["--api-token-file".to_string(), file.display().to_string()]);
        }
        flags.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = flags.iter().map(String::as_str).collect();
        let storaged = match home {
            Some(h) => Storaged::start_in(&work, &h.netns, h.addr.into(), &args, env)?,
            None => Storaged::start_with_env(&work, &args, env)?,
        };
        Ok(Node {
            id: id.to_string(),
            storaged,
            flags,
            repl,
        })
    }

    /// The node `id`.
    pub fn node(&self, id: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// The node `id`, mutable.
    pub fn node_mut(&mut self, id: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// Every node's NBD address, in order.
    pub fn nbd_addresses(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| n.storaged.nbd.to_string())
            .collect()
    }

    /// SIGKILL of node `id`.
    pub fn kill9(&mut self, id: &str) {
        self.node_mut(id).storaged.kill9();
    }

    /// Starts node `id` again on its data directory and its ports, with its flags.
    pub fn restart(&mut self, id: &str) -> Result<()> {
        let n = self.node_mut(id);
        let args: Vec<&str> = n.flags.iter().map(String::as_str).collect();
        n.storaged.start_again_with(&args)
    }

    /// The volume's records in etcd, as node `via` shows them.
    pub async fn view(&self, via: &str, volume: &str) -> Result<ReplicatedVolumeView> {
        let token = self.api_token.as_ref().map(|(_, t)| t.clone());
        let api = StoragedApi::new(&self.node(via).storaged.api.to_string(), token);
        Ok(api.replicated_volume(volume).await?)
    }

    /// Waits until node `via` shows a master for `volume` other than `not` (any master when
    /// `None`) with `pred` true of the view; returns the view.
    pub async fn wait_view(
        &self,
        via: &str,
        volume: &str,
        what: &str,
        pred: impl Fn(&ReplicatedVolumeView) -> bool,
    ) -> Result<ReplicatedVolumeView> {
        wait_for_async(what, crate::storaged::DEADLINE, || async {
            self.view(via, volume).await.ok().filter(|v| pred(v))
        })
        .await
    }

    /// Creates `volume` of `size` with `replicas` copies through node `via`, then waits until
    /// its first master is elected and serves it; returns the master's id and the view.
    pub async fn create_replicated(
        &self,
        via: &str,
        volume: &str,
        size: &str,
        replicas: u32,
    ) -> Result<(String, ReplicatedVolumeView)> {
        let copies = replicas.to_string();
        self.node(via)
            .storaged
            .create_volume(volume, size, &["--replicas", &copies])?;
        self.wait_master(via, volume).await
    }

    /// Waits until node `via` shows a master of `volume` and that master serves it; returns
    /// the master's id and the view.
    pub async fn wait_master(
        &self,
        via: &str,
        volume: &str,
    ) -> Result<(String, ReplicatedVolumeView)> {
        let v = self
            .wait_view(via, volume, "a first master", |v| v.master.is_some())
            .await?;
        let master = v.master.clone().expect("a master");
        self.wait_view(&master, volume, "the master serving", |v| {
            v.role_here.as_deref() == Some("master")
        })
        .await?;
        Ok((master, v))
    }

    /// The TLS settings of a client on host `host` (its own certificate; the server checked
    /// against the address it is reached at).
    pub fn client_tls(&self, host: &str) -> Result<Option<ClientTls>> {
        let Some(pki) = &self.pki else {
            return Ok(None);
        };
        Ok(Some(pki.client_checking(host, None)?))
    }

    /// A lease-aware client configuration for `volume` with every node's address, holding the
    /// primary lease of `host` (its reconnections keep trying for about a minute).
    pub fn client_config(&self, volume: &str, host: &str) -> Result<ClientConfig> {
        let mut cfg = ClientConfig::new(self.nbd_addresses(), volume).with_lease(LeaseSpec {
            host: host.into(),
            instance: format!("{host}-vm"),
            state: RequestedState::Primary,
            expected_epoch: 0,
        });
        cfg.rounds = 240;
        cfg.backoff_initial = Duration::from_millis(20);
        cfg.backoff_max = Duration::from_millis(250);
        cfg.connect_timeout = Duration::from_secs(2);
        cfg.tls = self.client_tls(host)?;
        Ok(cfg)
    }
}

/// Bytes of a record.
pub const RECORD: usize = 4096;

/// Record `i`: its index in the first 8 bytes, then a byte derived from it.
pub fn record(i: u64) -> Vec<u8> {
    let mut r = vec![(i % 251) as u8 ^ 0x5a; RECORD];
    r[..8].copy_from_slice(&i.to_be_bytes());
    r
}

/// Writers of records `0..records` (each written once, writer `w` taking `w, w + n, ...`)
/// through one [`FailoverClient`], counting acknowledgements and noting when the last came.
pub struct Writers {
    /// Records acknowledged so far.
    pub acked: Arc<AtomicU64>,
    last_ack: Arc<std::sync::Mutex<Instant>>,
    /// When the first record was acknowledged on each connection generation of the client.
    first_of_generation: Firsts,
    /// The records acknowledged so far, in the order of their acknowledgements.
    pub done: Arc<std::sync::Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Result<Vec<u64>>>>,
}

type Firsts = Arc<std::sync::Mutex<std::collections::BTreeMap<u64, Instant>>>;

impl Writers {
    /// Starts `n` writers.
    pub fn start(client: Arc<FailoverClient>, records: u64, n: u64) -> Writers {
        Self::paced(client, records, n, Duration::ZERO)
    }

    /// Starts `n` writers, each pausing `pause` after each acknowledged record (so that they
    /// last).
    pub fn paced(client: Arc<FailoverClient>, records: u64, n: u64, pause: Duration) -> Writers {
        let acked = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let last_ack = Arc::new(std::sync::Mutex::new(Instant::now()));
        let first_of_generation = Firsts::default();
        let done: Arc<std::sync::Mutex<Vec<u64>>> = Default::default();
        let tasks = (0..n)
            .map(|w| {
                let firsts = first_of_generation.clone();
                let done = done.clone();
                let (client, acked, stop, last) = (
                    client.clone(),
                    acked.clone(),
                    stop.clone(),
                    last_ack.clone(),
                );
                tokio::spawn(async move {
                    let mut i = w;
                    let mut mine = Vec::new();
                    while i < records && !stop.load(Ordering::SeqCst) {
                        let generation = client
                            .write_on(i * RECORD as u64, &record(i), false)
                            .await
                            .with_context(|| format!("record {i}"))?;
                        let now = Instant::now();
                        *last.lock().expect("last ack") = now;
                        firsts
                            .lock()
                            .expect("generations")
                            .entry(generation)
                            .or_insert(now);
                        done.lock().expect("done").push(i);
                        acked.fetch_add(1, Ordering::SeqCst);
                        mine.push(i);
                        i += n;
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                    Ok(mine)
                })
            })
            .collect();
        Writers {
            acked,
            last_ack,
            first_of_generation,
            done,
            stop,
            tasks,
        }
    }

    /// Waits until at least `n` records were acknowledged.
    pub async fn wait_acked(&self, n: u64) -> Result<()> {
        let what = format!("{n} acknowledged records");
        wait_for_async(&what, crate::storaged::DEADLINE, || async {
            (self.acked.load(Ordering::SeqCst) >= n).then_some(())
        })
        .await
    }

    /// Waits for the first acknowledgement after `since`; returns when it came.
    pub async fn first_ack_after(&self, since: Instant) -> Result<Instant> {
        let what = "an acknowledgement after the failure";
        wait_for_async(what, crate::storaged::DEADLINE, || async {
            let t = *self.last_ack.lock().expect("last ack");
            (t > since).then_some(t)
        })
        .await
    }

    /// Waits for the first acknowledgement on a connection after `generation` (a record
    /// acknowledged by whichever node the client found after losing that connection); returns
    /// when it came.
    pub async fn first_ack_after_generation(&self, generation: u64) -> Result<Instant> {
        let what = "an acknowledgement on a new connection";
        wait_for_async(what, crate::storaged::DEADLINE, || async {
            let firsts = self.first_of_generation.lock().expect("generations");
            firsts.range(generation + 1..).map(|(_, t)| *t).min()
        })
        .await
    }

    /// Lets the writers run to the end of their records (or to [`Self::stop`]); returns the
    /// records acknowledged, in order, or the first writer's error.
    pub async fn finish(self) -> Result<Vec<u64>> {
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await??);
        }
        all.sort_unstable();
        Ok(all)
    }

    /// Stops the writers after their current record; returns the records acknowledged.
    pub async fn stop(self) -> Result<Vec<u64>> {
        self.stop.store(true, Ordering::SeqCst);
        self.finish().await
    }
}

/// Checks that `data` (a volume's bytes) holds each of `records`.
pub fn verify_records(data: &[u8], records: &[u64], what: &str) -> Result<()> {
    for &i in records {
        let at = i as usize * RECORD;
        anyhow::ensure!(
            data.get(at..at + RECORD) == Some(&record(i)[..]),
            "record {i} on {what} is not what was acknowledged"
        );
    }
    Ok(())
}
