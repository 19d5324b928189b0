//! What the NBD server lets one client, and all of them together, hold: connections, time in
//! the handshake and idle, memory for requests in flight, and how long a client may leave its
//! replies unread. Every limit has a default an operator can change (`storaged serve --help`).
//!
//! Memory: each request in flight holds a share of its connection's budget
//! ([`Limits::inflight_per_connection`]) and of the server's ([`Limits::inflight_total`]) from
//! before its data is read until its reply has gone to the socket, errors included. A client
//! that stops reading its replies therefore stops being read, and one that leaves them unread
//! for [`Limits::reply_timeout`] is disconnected.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Budget charged per request on top of its length (bounds the number of requests in flight:
/// 256 per connection with the default budget).
pub const REQUEST_OVERHEAD: u32 = 256 << 10;

/// The server's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Open connections, in the handshake or in transmission; more are closed at once.
    pub max_connections: usize,
    /// Connections in transmission per volume; more are refused at `NBD_OPT_GO`.
    pub max_connections_per_volume: usize,
    /// Longest a client may take from accept to transmission.
    pub handshake_timeout: Duration,
    /// A connection without a lease that sends nothing for this long, with nothing in flight,
    /// is closed (lease holders are known hosts and may idle: a standby waits for its flip).
    pub idle_timeout: Duration,
    /// A client that accepts none of its replies for this long is disconnected.
    pub reply_timeout: Duration,
    /// Bytes of requests in flight per connection (each costs its length plus
    /// [`REQUEST_OVERHEAD`]); at least the largest request plus the overhead.
    pub inflight_per_connection: u32,
    /// Bytes of requests in flight over all connections.
    pub inflight_total: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_connections_per_volume: 128,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            reply_timeout: Duration::from_secs(60),
            inflight_per_connection: 64 << 20,
            inflight_total: 1 << 30,
        }
    }
}

/// The server-wide budget of bytes in flight, shared by every connection.
#[derive(Debug, Clone)]
pub struct Budget {
    total: Arc<Semaphore>,
    per_connection: u32,
}

/// One request's share of its connection's and the server's budgets, held until its reply
/// has been written.
#[derive(Debug)]
pub struct Permit {
    _connection: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
}

impl Budget {
    /// The budget of `limits`.
    pub fn new(limits: &Limits) -> Budget {
        let total = limits
            .inflight_total
            .clamp(limits.inflight_per_connection.into(), u32::MAX.into());
        Budget {
            total: Arc::new(Semaphore::new(total as usize)),
            per_connection: limits.inflight_per_connection,
        }
    }

    /// A fresh budget for one connection.
    pub fn connection(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.per_connection as usize))
    }

    /// Waits for the share of a request of `len` bytes: first the connection's, then the
    /// server's (a connection never waits for the server's while holding back others).
    pub async fn acquire(&self, connection: &Arc<Semaphore>, len: u32) -> Permit {
        let n = len
            .saturating_add(REQUEST_OVERHEAD)
            .min(self.per_connection);
        let closed = "budget semaphores are never closed";
        let conn = connection
            .clone()
            .acquire_many_owned(n)
            .await
            .expect(closed);
        let total = self
            .total
            .clone()
            .acquire_many_owned(n)
            .await
            .expect(closed);
        Permit {
            _connection: conn,
            _total: total,
        }
    }

    /// Whether nothing of `connection`'s budget is in use.
    pub fn idle(&self, connection: &Semaphore) -> bool {
        connection.available_permits() == self.per_connection as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test]
    async fn permits_come_from_both_budgets_until_dropped() {
        let limits = Limits {
            inflight_per_connection: 2 * REQUEST_OVERHEAD,
            inflight_total: 3 * REQUEST_OVERHEAD as u64,
            ..Limits::default()
        };
        let b = Budget::new(&limits);
        let (c1, c2) = (b.connection(), b.connection());
        let p1 = b.acquire(&c1, 0).await;
        let p2 = b.acquire(&c1, 0).await;
        assert!(!b.idle(&c1));
        // The connection's budget is spent; the server's has room for one more.
        let p3 = b.acquire(&c2, 0).await;
        let waiting = b.acquire(&c2, 0).now_or_never();
        assert!(waiting.is_none(), "the server's budget is spent");
        drop((p1, p2));
        assert!(b.idle(&c1));
        drop(p3);
        // A request longer than the connection's budget takes all of it.
        let _p4 = b.acquire(&c2, u32::MAX).await;
        assert_eq!(c2.available_permits(), 0);
    }
}
