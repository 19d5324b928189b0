//! A client that follows a volume across storage nodes (cluster mode): when its connection
//! drops (the master died or was deposed), it reconnects through the connection logic (no
//! answer or "not master" -> next address, with backoff) with the lease it held, and retries
//! the requests that had no reply. Retrying is safe because every retried command is
//! idempotent (WRITE, WRITE_ZEROES, TRIM, FLUSH, READ): a write whose reply was lost is
//! written again with the same data.

use super::{Client, ClientConfig, ClientError};
use std::future::Future;

/// A [`Client`] that reconnects and retries after a failover.
pub struct FailoverClient {
    cfg: ClientConfig,
    current: tokio::sync::Mutex<(u64, Client)>,
    /// Reconnections allowed per request before its error is returned.
    pub max_reconnects: u32,
}

/// Whether the error means "this connection is gone", not "the server refused".
fn lost(e: &ClientError) -> bool {
    matches!(e, ClientError::Disconnected | ClientError::Io(_))
}

impl FailoverClient {
    /// Connects following `cfg` (its addresses are the volume's nodes).
    pub async fn connect(cfg: ClientConfig) -> Result<FailoverClient, ClientError> {
        let c = Client::connect(&cfg).await?;
        Ok(FailoverClient {
            cfg,
            current: tokio::sync::Mutex::new((0, c)),
            max_reconnects: 8,
        })
    }

    /// How many times the client reconnected so far (the generation of its connection).
    pub async fn generation(&self) -> u64 {
        self.current.lock().await.0
    }

    /// The connection in use and its generation.
    async fn client(&self) -> (u64, Client) {
        self.current.lock().await.clone()
    }

    /// Replaces connection `generation` (if no other caller did already) with a new one that
    /// asks for the lease state the old one held.
    async fn reconnect(&self, generation: u64) -> Result<(), ClientError> {
        let mut cur = self.current.lock().await;
        if cur.0 != generation {
            return Ok(());
        }
        let mut cfg = self.cfg.clone();
        if let (Some(l), Some((state, _))) = (cfg.lease.as_mut(), cur.1.lease()) {
            l.state = state;
            l.expected_epoch = 0;
        }
        let c = Client::connect(&cfg).await?;
        tracing::info!(
            generation = generation + 1,
            "storage connection re-established"
        );
        *cur = (generation + 1, c);
        Ok(())
    }

    /// Runs `f` on the current connection, reconnecting and running it again while the
    /// connection is lost.
    pub async fn retry<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        self.retry_on(f).await.map(|(r, _)| r)
    }

    /// [`Self::retry`], also returning the generation of the connection that answered.
    pub async fn retry_on<T, F, Fut>(&self, f: F) -> Result<(T, u64), ClientError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let mut reconnects = 0;
        loop {
            let (generation, c) = self.client().await;
            match f(c).await {
                Err(e) if lost(&e) && reconnects < self.max_reconnects => {
                    reconnects += 1;
                    self.reconnect(generation).await?;
                }
                r => return r.map(|v| (v, generation)),
            }
        }
    }

    /// [`Self::write`], returning the generation of the connection that acknowledged it
    /// (larger than before a failover: the new master's).
    pub async fn write_on(&self, offset: u64, data: &[u8], fua: bool) -> Result<u64, ClientError> {
        self.retry_on(|c| async move { c.write_slice(offset, data, fua).await })
            .await
            .map(|((), g)| g)
    }

    /// Writes `data` at `offset` (see [`Client::write_slice`]).
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        self.retry(|c| async move { c.write_slice(offset, data, fua).await })
            .await
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, ClientError> {
        self.retry(|c| async move { c.read(offset, len).await })
            .await
    }

    /// Makes completed writes durable on every copy.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.retry(|c| async move { c.flush().await }).await
    }

    /// The connection in use (for calls without a wrapper here).
    pub async fn current(&self) -> Client {
        self.client().await.1
    }
}
