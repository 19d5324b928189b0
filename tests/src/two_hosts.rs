//! Two hosts "a" and "b", each with its own migrated in a network namespace, peers of each
//! other, and a storage host ([`NsStoraged`]); and a stale writer, the connection an old host
//! could still write through after its guest moved on.

use crate::migrated::{Migrated, MigratedOptions};
use crate::netns::Host;
use crate::ns_storaged::NsStoraged;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::sync::mpsc;
use storaged_client::nbd::{Client, ClientConfig, ClientTls, LeaseSpec};
use storaged_client::protocol::RequestedState;

/// storaged and two hosts "a" and "b", each in its own network namespace with its own
/// migrated (REST on port 7070 of its address), peers of each other.
pub struct TwoHosts {
    // Field order is drop order: the agents (and their VMMs) first, the namespaces last.
    /// Host a.
    pub a: Migrated,
    /// Host b.
    pub b: Migrated,
    /// The storage host.
    pub storaged: NsStoraged,
    /// The namespaces.
    pub rig: crate::netns::Rig,
    /// The cluster's CA and the hosts' certificates, when everything runs in TLS.
    pub pki: Option<crate::pki::Pki>,
}

/// The REST port of the agents of [`TwoHosts`].
pub const AGENT_PORT: u16 = 7070;

impl TwoHosts {
    /// Starts everything under `dir` and creates the 64 MiB volumes `volumes`. The agents
    /// declare a peer lost after `peer_timeout_ms`.
    pub fn start(dir: &Path, volumes: &[&str], peer_timeout_ms: u64) -> Result<TwoHosts> {
        Self::start_with(dir, volumes, peer_timeout_ms, false)
    }

    /// [`Self::start`]; with `tls`, a cluster CA (`storaged pki ca`) certifies storage, a and b
    /// (`storaged pki host`), storaged requires TLS from every client not on loopback, and the
    /// agents, their VMMs and the migration streams use the hosts' certificates.
    pub fn start_with(
        dir: &Path,
        volumes: &[&str],
        peer_timeout_ms: u64,
        tls: bool,
    ) -> Result<TwoHosts> {
        let rig = crate::netns::Rig::new(&["storage", "a", "b"])?;
        // One token for the cluster: storaged's API and the agents' APIs require it, and every
        // call between them carries it.
        let token_file = crate::write_token(dir, "two-hosts-cluster-secret")?;
        let pki = tls
            .then(|| crate::pki::Pki::new(dir, "cluster"))
            .transpose()?;
        let storage_tls = pki
            .as_ref()
            .map(|p| p.host_at("storage", &[rig.host("storage").addr.into()]))
            .transpose()?;
        let storaged = NsStoraged::start(
            rig.host("storage"),
            &dir.join("storaged"),
            &token_file,
            storage_tls.as_deref(),
        )?;
        for v in volumes {
            storaged.cli(&["volume", "create", v, "--size", "64M"])?;
        }
        let storage = HostsStorage {
            api: &storaged.api,
            nbd: &storaged.nbd,
            name: tls.then_some("storage"),
            token_file: &token_file,
        };
        let (a, b) = start_agents(dir, &rig, pki.as_ref(), &storage, peer_timeout_ms)?;
        Ok(TwoHosts {
            a,
            b,
            storaged,
            rig,
            pki,
        })
    }

    /// The agent of host `name`.
    pub fn agent(&self, name: &str) -> &Migrated {
        crate::migrated::agent_named(&self.a, &self.b, name)
    }
}

/// Where the agents of [`start_agents`] find storaged.
pub struct HostsStorage<'a> {
    /// Its REST API (one node's, for a cluster).
    pub api: &'a str,
    /// Its NBD address (every node's, comma-separated, for a cluster).
    pub nbd: &'a str,
    /// The host id its certificate proves (`None`: the address it is reached at).
    pub name: Option<&'a str>,
    /// The cluster's token: storaged's API and the agents' APIs require it.
    pub token_file: &'a Path,
}

/// The agents of hosts "a" and "b" of `rig` (REST on [`AGENT_PORT`] of their addresses), peers
/// of each other, their state under `dir/a` and `dir/b`; with `pki`, each with a certificate
/// of its host (valid for its address) for TLS to storaged, between VMMs and between agents.
pub fn start_agents(
    dir: &Path,
    rig: &crate::netns::Rig,
    pki: Option<&crate::pki::Pki>,
    storage: &HostsStorage<'_>,
    peer_timeout_ms: u64,
) -> Result<(Migrated, Migrated)> {
    let addr = |h: &str| format!("{}:{AGENT_PORT}", rig.host(h).addr);
    let opts = |me: &str, peer: &str| -> Result<MigratedOptions> {
        Ok(MigratedOptions {
            tls_dir: pki
                .map(|p| p.host_at(me, &[rig.host(me).addr.into()]))
                .transpose()?,
            storaged_name: storage.name.map(str::to_string),
            host_id: me.into(),
            listen: addr(me),
            storaged_api: storage.api.to_string(),
            storaged_nbd: storage.nbd.to_string(),
            peers: vec![(peer.into(), addr(peer))],
            netns: Some(rig.host(me).clone()),
            peer_timeout_ms,
            token_file: Some(storage.token_file.to_path_buf()),
            storaged_token_file: Some(storage.token_file.to_path_buf()),
            env: Vec::new(),
            log_json: false,
        })
    };
    let a = Migrated::start(&dir.join("a"), opts("a", "b")?)?;
    let b = Migrated::start(&dir.join("b"), opts("b", "a")?)?;
    Ok((a, b))
}

/// A storaged connection from a host's namespace, as the holder (host, vm1) of a volume, opened
/// while that host is primary, on a thread of its own (the namespace is per thread): what a
/// slow or buggy old host could still try to write with after a flip.
pub struct StaleWriter {
    /// What the connection did when it opened.
    pub opened: String,
    go: mpsc::Sender<()>,
    result: mpsc::Receiver<Vec<String>>,
}

impl StaleWriter {
    /// Opens the connection (and reads a block through it).
    pub fn open(h: &TwoHosts, host: &str, volume: &str) -> Result<StaleWriter> {
        // In TLS, with the host's own certificate: the old host itself, not an impostor.
        let tls = h
            .pki
            .as_ref()
            .map(|p| p.client(host, "storage"))
            .transpose()?;
        Self::open_at(h.rig.host(host), vec![h.storaged.nbd.clone()], tls, volume)
    }

    /// Opens the connection from test host `from` (as host `from.name`) to storaged at
    /// `addresses` (every node of a cluster), in TLS with `tls` if given.
    pub fn open_at(
        from: &Host,
        addresses: Vec<String>,
        tls: Option<ClientTls>,
        volume: &str,
    ) -> Result<StaleWriter> {
        let host = from.name.as_str();
        let netns = format!("/var/run/netns/{}", from.netns);
        let plain = ClientConfig::new(addresses, volume).with_lease(LeaseSpec {
            host: host.into(),
            instance: "vm1".into(),
            state: RequestedState::Primary,
            expected_epoch: 0,
        });
        let cfg = match &tls {
            Some(t) => plain.clone().with_tls(t.clone()),
            None => plain.clone(),
        };
        let what = format!("second connection to {volume} as its primary holder");
        let (opened_tx, opened_rx) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<()>();
        let (result_tx, result) = mpsc::channel();
        std::thread::spawn(move || {
            let run = || -> Result<()> {
                let ns = std::fs::File::open(&netns)?;
                // SAFETY: setns(2) on a namespace file we opened; it changes only this
                // thread's network namespace, which the sockets made below then use.
                if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) }
                    != 0
                {
                    bail!("setns {netns}: {}", std::io::Error::last_os_error());
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let c = rt.block_on(Client::connect(&cfg))?;
                let block = rt.block_on(c.read(0, 4096))?;
                let _ = opened_tx.send(Ok(format!("{what} (lease {:?}); read 4 KiB", c.lease())));
                if go_rx.recv().is_err() {
                    return Ok(());
                }
                let mut out = Vec::new();
                // The same bytes it read: harmless if it were (wrongly) accepted.
                match rt.block_on(c.write(0, block, true)) {
                    Ok(()) => out
                        .push("write through the old connection: ACCEPTED (fencing broken)".into()),
                    Err(e) => out.push(format!(
                        "write through its connection opened before the flip: refused ({e}: storaged fenced and closed it at the flip)"
                    )),
                }
                match rt.block_on(Client::connect(&cfg)) {
                    Ok(_) => out.push(
                        "new connection from the old host as primary: ACCEPTED (fencing broken)"
                            .into(),
                    ),
                    Err(e) => out.push(format!(
                        "new connection from the old host as primary: refused ({e})"
                    )),
                }
                if tls.is_some() {
                    match rt.block_on(Client::connect(&plain)) {
                        Ok(_) => out.push(
                            "connection without a certificate: ACCEPTED (TLS not required)".into(),
                        ),
                        Err(e) => {
                            out.push(format!("connection without a certificate: refused ({e})"))
                        }
                    }
                }
                let _ = result_tx.send(out);
                Ok(())
            };
            if let Err(e) = run() {
                let _ = opened_tx.send(Err(e));
            }
        });
        let opened = opened_rx.recv().context("the connection thread ended")??;
        Ok(StaleWriter { opened, go, result })
    }

    /// Writes through the old connection, then opens a new one as primary; fails if either is
    /// accepted, else returns how each was refused.
    pub fn attempt(self) -> Result<Vec<String>> {
        self.go.send(()).context("the connection thread ended")?;
        let out = self.result.recv().context("the connection thread ended")?;
        if out.iter().any(|l| l.contains("ACCEPTED")) {
            bail!("the old host was not fenced: {}", out.join("; "));
        }
        Ok(out)
    }
}
