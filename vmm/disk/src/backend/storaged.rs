//! A storaged volume over NBD, opened with a lease through storaged's async client.
//!
//! The first connection is made when the VM is built: a volume another host holds as
//! primary, or one this host was deactivated on, is refused there with the server's reason,
//! before the guest runs. Requests are pipelined on the one connection (the client allows
//! any number in flight; replies complete out of order). A request larger than the server's
//! maximum is split.
//!
//! When the connection breaks (storaged restarted, the network cut, or a lease flip that
//! disconnected this host and was then rolled back), the next request reconnects with the
//! configured lease, through the client's connection logic ("already primary" is retried as
//! primary, so a standby that was promoted comes back as primary), and is retried on the new
//! connection. While storaged cannot be reached at all, the requests are held and the
//! reconnect retried for the disk's hold window ([`super::outage`]) before they fail. A write
//! retried this way is idempotent: the guest has not seen it complete, so it has issued
//! nothing after it that depends on it. A "deactivated" refusal is final:
//! another host took the volume over, and every later request fails at once with that error
//! (an I/O error in the guest) without asking storaged again. A request storaged fenced
//! (EPERM, the barrier of a flip) is never retried: it fails, and the request after it
//! reconnects (storaged closes the fenced connection) and learns the outcome of the flip.

use super::outage::{is_unreachable, Next, Outage};
use super::tls::DiskIdentity;
use super::BackendError;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use storaged_client::nbd::{Client, ClientConfig, ClientError, LeaseSpec};
use storaged_client::protocol::{
    RequestedState, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES,
};
use vmm_api::config::{LeaseMode, StoragedDiskConfig};

/// The connection in use, and how many times it was replaced.
#[derive(Debug)]
struct Conn {
    client: Client,
    generation: u64,
    /// The deactivated refusal that ended this backend for good.
    deactivated: Option<String>,
}

/// A connected volume.
#[derive(Debug)]
pub struct StoragedBackend {
    conn: Mutex<Conn>,
    /// Serialises reconnects: requests failing together make one new connection.
    reconnect: tokio::sync::Mutex<()>,
    /// While storaged cannot be reached: how long requests are held.
    outage: Outage,
    cfg: Arc<ClientConfig>,
    size: u64,
    flags: u16,
    max: u64,
}

impl StoragedBackend {
    /// Connects to the volume with the configured lease. Must run inside the tokio runtime
    /// that will serve the I/O (the client's reader task lives there).
    pub async fn connect(
        cfg: &StoragedDiskConfig,
        vm_name: &str,
    ) -> Result<StoragedBackend, BackendError> {
        let state = match cfg.lease {
            LeaseMode::Standby => RequestedState::Standby,
            LeaseMode::Primary => RequestedState::Primary,
        };
        let instance = cfg
            .instance_id
            .clone()
            .unwrap_or_else(|| vm_name.to_string());
        let id = DiskIdentity::of(cfg)?;
        let mut client_cfg =
            ClientConfig::new(cfg.all_addresses(), cfg.volume.clone()).with_lease(LeaseSpec {
                host: id.host.clone(),
                instance,
                state,
                expected_epoch: 0,
            });
        client_cfg.tls = id.tls;
        let client = Client::connect(&client_cfg).await?;
        tracing::info!(
            volume = %cfg.volume,
            host = %id.host,
            tls = client_cfg.tls.is_some(),
            lease = ?client.lease(),
            size = client.size(),
            "storaged volume connected"
        );
        Ok(StoragedBackend {
            size: client.size(),
            flags: client.flags(),
            max: u64::from(client.max_request().max(4096)),
            conn: Mutex::new(Conn {
                client,
                generation: 0,
                deactivated: None,
            }),
            reconnect: tokio::sync::Mutex::new(()),
            outage: Outage::new(cfg.io_hold()),
            cfg: Arc::new(client_cfg),
        })
    }

    pub(super) fn size(&self) -> u64 {
        self.size
    }

    pub(super) fn read_only(&self) -> bool {
        self.flags & NBD_FLAG_READ_ONLY != 0
    }

    pub(super) fn supports_discard(&self) -> bool {
        self.flags & NBD_FLAG_SEND_TRIM != 0 && self.flags & NBD_FLAG_SEND_WRITE_ZEROES != 0
    }

    fn conn(&self) -> MutexGuard<'_, Conn> {
        // The guarded data is replaced whole; a panic elsewhere cannot leave it half-written.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The client to use, with its generation; the final refusal if there is one.
    fn current(&self) -> Result<(Client, u64), ClientError> {
        let c = self.conn();
        match &c.deactivated {
            Some(message) => Err(ClientError::Deactivated {
                message: message.clone(),
            }),
            None => Ok((c.client.clone(), c.generation)),
        }
    }

    /// Replaces the connection of generation `seen` (unless another request already did).
    /// While storaged cannot be reached, tries again with backoff until the hold window of
    /// the outage runs out.
    async fn reconnect(&self, seen: u64, cause: &ClientError) -> Result<Client, ClientError> {
        let tried = self.outage.attempts();
        let _one = self.reconnect.lock().await;
        let (client, generation) = self.current()?;
        if generation != seen && client.is_connected() {
            return Ok(client);
        }
        if let Some(e) = self.outage.failed_meanwhile(tried) {
            return Err(e);
        }
        let volume = self.cfg.export.as_str();
        let host = self.cfg.lease.as_ref().map(|l| l.host.as_str());
        tracing::warn!(volume, host, error = %cause, "storaged connection lost; reconnecting");
        let mut backoff = std::time::Duration::ZERO;
        loop {
            match Client::connect(&self.cfg).await {
                Ok(client) => {
                    let held_ms = self.outage.end().map(|d| d.as_millis() as u64);
                    tracing::info!(target: "vmm::lease", volume, host, lease = ?client.lease(),
                        generation = generation + 1, held_ms, "storaged volume reconnected");
                    let mut c = self.conn();
                    c.client = client.clone();
                    c.generation = generation + 1;
                    return Ok(client);
                }
                Err(ClientError::Deactivated { message }) => {
                    self.outage.end();
                    tracing::error!(target: "vmm::lease", volume, host, reason = %message,
                        "deactivated on the volume: every further request fails");
                    self.conn().deactivated = Some(message.clone());
                    return Err(ClientError::Deactivated { message });
                }
                Err(e) if is_unreachable(&e) => match self.outage.failed(volume, &e, backoff) {
                    Next::Retry(pause) => {
                        backoff = pause;
                        tokio::time::sleep(pause).await;
                    }
                    Next::GiveUp => return Err(e),
                },
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs `op` on the connection; if the connection is broken, reconnects and runs it again
    /// on the new one, for as long as the hold window lasts.
    async fn with_retry<T, F, Fut>(&self, op: F) -> Result<T, BackendError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let started = std::time::Instant::now();
        let (client, mut generation) = self.current()?;
        let mut cause = if client.is_connected() {
            match op(client).await {
                Err(e) if is_broken(&e) => e,
                other => return Ok(other?),
            }
        } else {
            ClientError::Disconnected
        };
        loop {
            let client = self.reconnect(generation, &cause).await?;
            match op(client).await {
                // A storaged that accepts and then drops the connection again: once more,
                // within the window.
                Err(e) if is_broken(&e) && started.elapsed() < self.outage.window() => {
                    cause = e;
                    generation = self.current()?.1;
                }
                other => return Ok(other?),
            }
        }
    }

    /// Splits `offset..offset+len` into pieces the server accepts.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let max = self.max;
        (0..len.div_ceil(max)).map(move |i| {
            let at = i * max;
            (offset + at, (len - at).min(max))
        })
    }

    pub(super) async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, BackendError> {
        let mut out = Vec::with_capacity(len);
        for (at, n) in self.pieces(offset, len as u64) {
            let piece = self
                .with_retry(|c| async move { c.read(at, n as usize).await })
                .await?;
            if out.is_empty() && n == len as u64 {
                return Ok(piece);
            }
            out.extend(piece);
        }
        Ok(out)
    }

    pub(super) async fn write(&self, offset: u64, data: Vec<u8>) -> Result<(), BackendError> {
        for (at, n) in self.pieces(offset, data.len() as u64) {
            let piece = &data[(at - offset) as usize..(at - offset + n) as usize];
            self.with_retry(|c| async move { c.write_slice(at, piece, false).await })
                .await?;
        }
        Ok(())
    }

    pub(super) async fn flush(&self) -> Result<(), BackendError> {
        self.with_retry(|c| async move { c.flush().await }).await
    }

    pub(super) async fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        for (at, n) in self.pieces(offset, len) {
            self.with_retry(|c| async move { c.trim(at, n as u32).await })
                .await?;
        }
        Ok(())
    }

    pub(super) async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        for (at, n) in self.pieces(offset, len) {
            // no_hole: the device reports write_zeroes_may_unmap = 0.
            self.with_retry(|c| async move { c.write_zeroes(at, n as u32, true, false).await })
                .await?;
        }
        Ok(())
    }
}

/// Whether `e` means the connection is gone (reconnect) rather than an answer to the request.
fn is_broken(e: &ClientError) -> bool {
    matches!(e, ClientError::Disconnected | ClientError::Io(_))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use storaged::flip::{self, FlipTrigger};
    use storaged::registry::Registry;
    use storaged_client::api::VolumeConfig;

    /// An in-process storaged with one 1 MiB volume `v`; the registry drives flips directly.
    async fn storage(
        dir: &std::path::Path,
    ) -> (Arc<Registry>, String, tokio::sync::watch::Sender<bool>) {
        let reg = Arc::new(Registry::open(dir).unwrap());
        reg.create(VolumeConfig::new("v", 1 << 20)).await.unwrap();
        let nbd = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = nbd.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(storaged::server::run(
            nbd,
            reg.clone(),
            None,
            rx,
            Duration::from_secs(1),
        ));
        (reg, addr, tx)
    }

    pub(super) fn disk(addr: &str, host: &str, lease: LeaseMode) -> StoragedDiskConfig {
        StoragedDiskConfig {
            address: addr.into(),
            addresses: Vec::new(),
            volume: "v".into(),
            host_id: Some(host.into()),
            instance_id: None,
            lease,
            io_hold_secs: None,
            tls_dir: None,
            server_name: None,
        }
    }

    fn deactivated(r: Result<impl std::fmt::Debug, BackendError>) -> bool {
        matches!(
            r,
            Err(BackendError::Storaged(ClientError::Deactivated { .. }))
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rolled_back_flip_reconnects_and_a_completed_one_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, addr, _stop) = storage(dir.path()).await;
        let vol = reg.get("v").unwrap();
        let a = StoragedBackend::connect(&disk(&addr, "a", LeaseMode::Primary), "vm1")
            .await
            .unwrap();
        a.write(0, vec![1; 4096]).await.unwrap();
        let b = StoragedBackend::connect(&disk(&addr, "b", LeaseMode::Standby), "vm1")
            .await
            .unwrap();

        // A flip to b cuts a's connection; rolled back, a is primary again: its next requests
        // reconnect as primary and succeed, the guest sees no error.
        flip::flip(&reg, &vol, Some("b"), FlipTrigger::Api)
            .await
            .unwrap();
        flip::rollback(&reg, &vol).await.unwrap();
        a.write(4096, vec![2; 8192]).await.unwrap();
        a.flush().await.unwrap();
        assert_eq!(a.read(0, 4096).await.unwrap(), vec![1; 4096]);
        assert_eq!(a.read(4096, 8192).await.unwrap(), vec![2; 8192]);
        assert_eq!(a.conn().generation, 1);

        // Flipped for good: a's reconnect is refused as deactivated; that is final, and every
        // later request fails at once without a new connection.
        flip::flip(&reg, &vol, Some("b"), FlipTrigger::Api)
            .await
            .unwrap();
        assert!(deactivated(a.write(0, vec![3; 4096]).await));
        assert!(deactivated(a.read(0, 4096).await));
        assert!(deactivated(a.flush().await));
        assert!(deactivated(a.discard(0, 4096).await));
        assert!(deactivated(a.write_zeroes(0, 4096).await));
        assert!(a.conn().deactivated.is_some());
        assert_eq!(a.conn().generation, 1);

        // The promoted standby reads what a wrote before the flip, never a's refused write.
        assert_eq!(b.read(0, 4096).await.unwrap(), vec![1; 4096]);
        b.write(0, vec![4; 4096]).await.unwrap();
        assert_eq!(b.read(0, 4096).await.unwrap(), vec![4; 4096]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_split_and_failing_together_make_one_new_connection() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, addr, _stop) = storage(dir.path()).await;
        let vol = reg.get("v").unwrap();
        let mut a = StoragedBackend::connect(&disk(&addr, "a", LeaseMode::Primary), "vm1")
            .await
            .unwrap();
        // Small pieces, as if the server's maximum were one page.
        a.max = 4096;
        let a = Arc::new(a);
        let _b = StoragedBackend::connect(&disk(&addr, "b", LeaseMode::Standby), "vm1")
            .await
            .unwrap();
        flip::flip(&reg, &vol, Some("b"), FlipTrigger::Api)
            .await
            .unwrap();
        flip::rollback(&reg, &vol).await.unwrap();
        let len = 4096 * 5 + 512;
        let mut tasks = Vec::new();
        for i in 0..8u8 {
            let a = a.clone();
            tasks.push(tokio::spawn(async move {
                a.write(u64::from(i) * 4096, vec![i; 4096]).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(a.conn().generation, 1);
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        a.write(0, data.clone()).await.unwrap();
        assert_eq!(a.read(0, len).await.unwrap(), data);
    }
}

#[cfg(test)]
mod outage_tests {
    use super::*;
    use std::time::Duration;
    use storaged::registry::Registry;
    use storaged_client::api::VolumeConfig;

    /// An in-process storaged serving `reg` on `addr` until the returned sender says stop.
    async fn serve(
        reg: &Arc<Registry>,
        addr: &str,
    ) -> (
        tokio::task::JoinHandle<()>,
        tokio::sync::watch::Sender<bool>,
    ) {
        let nbd = tokio::net::TcpListener::bind(addr).await.unwrap();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let server = storaged::server::run(nbd, reg.clone(), None, rx, Duration::from_secs(1));
        (tokio::spawn(server), tx)
    }

    /// Volume `v` in a registry, and an address for storaged to serve it on (the same one
    /// after a restart).
    async fn volume(dir: &std::path::Path) -> (Arc<Registry>, String) {
        let reg = Arc::new(Registry::open(dir).unwrap());
        reg.create(VolumeConfig::new("v", 1 << 20)).await.unwrap();
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        (reg, addr)
    }

    fn config(addr: &str, hold_secs: u64) -> StoragedDiskConfig {
        StoragedDiskConfig {
            address: addr.into(),
            addresses: Vec::new(),
            volume: "v".into(),
            host_id: Some("a".into()),
            instance_id: None,
            lease: LeaseMode::Primary,
            io_hold_secs: Some(hold_secs),
            tls_dir: None,
            server_name: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_are_held_while_storaged_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, addr) = volume(dir.path()).await;
        let (server, stop) = serve(&reg, &addr).await;
        let a = Arc::new(
            StoragedBackend::connect(&config(&addr, 60), "vm1")
                .await
                .unwrap(),
        );
        a.write(0, vec![1; 4096]).await.unwrap();

        // storaged goes away; a write meanwhile is held, not failed...
        stop.send(true).unwrap();
        server.await.unwrap();
        let mut failed = a.outage.watch();
        let write = tokio::spawn({
            let a = a.clone();
            async move { a.write(4096, vec![2; 4096]).await }
        });
        failed.wait_for(|n| *n >= 2).await.unwrap();
        assert!(!write.is_finished());

        // ...and completes once storaged is back, on the same address.
        let (_server, _stop) = serve(&reg, &addr).await;
        write.await.unwrap().unwrap();
        assert_eq!(a.read(0, 8192).await.unwrap()[4095..4097], [1, 2]);
        assert_eq!(a.conn().generation, 1);
        assert!(
            a.outage.end().is_none(),
            "the outage ended with the reconnect"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_fail_once_the_hold_window_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, addr) = volume(dir.path()).await;
        let (server, stop) = serve(&reg, &addr).await;
        let a = StoragedBackend::connect(&config(&addr, 0), "vm1")
            .await
            .unwrap();
        stop.send(true).unwrap();
        server.await.unwrap();
        // No window: the request fails after one reconnect, as it would after a long one.
        assert!(matches!(
            a.write(0, vec![1; 4096]).await,
            Err(BackendError::Storaged(ClientError::Unreachable { .. }))
        ));
        // storaged back: the next request reconnects.
        let (_server, _stop) = serve(&reg, &addr).await;
        a.write(0, vec![3; 4096]).await.unwrap();
        assert_eq!(a.read(0, 4096).await.unwrap(), vec![3; 4096]);
    }
}

#[cfg(test)]
mod starved_tests {
    use super::super::testing::{runtime, storaged_apart};
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// Requests in flight at once, as a guest's queue keeps them.
    const IN_FLIGHT: usize = 64;
    /// Requests in all.
    const REQUESTS: usize = 4000;

    /// Many requests in flight on a VMM-sized runtime (two workers) whose threads compete for
    /// the CPU with busy threads: every one of them reaches storaged and completes, as the
    /// virtio-blk worker spawns them (one task each, completions over a channel).
    #[test]
    fn every_request_completes_on_a_starved_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let (_storaged, addr, _stop) = storaged_apart(dir.path(), None);
        let vmm_rt = runtime(2);
        let cfg = super::tests::disk(&addr, "a", LeaseMode::Primary);
        let backend = Arc::new(
            vmm_rt
                .block_on(StoragedBackend::connect(&cfg, "vm1"))
                .unwrap(),
        );

        // Busy threads, one per core and one more.
        let stop = Arc::new(AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let hogs: Vec<_> = (0..=cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();

        let (done_tx, done_rx) = std::sync::mpsc::channel();
        vmm_rt.spawn(async move {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let mut started = 0usize;
            let mut completed = 0usize;
            let start = |i: usize| {
                let backend = backend.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    // Small writes (copied into one send), large ones (sent in place),
                    // flushes and reads, at offsets of their own.
                    let offset = (i % 256) as u64 * (256 << 10);
                    let r = match i % 4 {
                        0 => backend.write(offset, vec![i as u8; 4096]).await,
                        1 => backend.write(offset, vec![i as u8; 128 << 10]).await,
                        2 => backend.flush().await,
                        _ => backend.read(offset, 4096).await.map(|_| ()),
                    };
                    let _ = tx.send((i, r));
                });
            };
            while started < IN_FLIGHT {
                start(started);
                started += 1;
            }
            while let Some((i, r)) = rx.recv().await {
                if let Err(e) = r {
                    panic!("request {i}: {e}");
                }
                completed += 1;
                let _ = done_tx.send(completed);
                if started < REQUESTS {
                    start(started);
                    started += 1;
                }
            }
        });
        let mut completed = 0;
        while completed < REQUESTS {
            match done_rx.recv_timeout(Duration::from_secs(60)) {
                Ok(n) => completed = n,
                Err(_) => break,
            }
        }
        stop.store(true, Ordering::Relaxed);
        for h in hogs {
            h.join().unwrap();
        }
        assert_eq!(completed, REQUESTS, "requests stuck in flight");
    }
}
