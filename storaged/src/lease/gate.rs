//! The admission gate of one NBD connection: what the connection may do right now and how
//! many of its requests are inside the disk I/O stage.
//!
//! A request is *admitted* when it passes the gate just before it touches the volume file
//! (after a write's payload has been received). A flip raises the barrier by setting the
//! old primary's gates to [`Access::Fenced`] and then waits until their in-flight count is
//! zero: from then on nothing from that connection reaches the disk. Check-and-count happen
//! under one lock, so no request can slip between the barrier and the drain.

use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::watch;

/// A gate wait that did not finish in time.
#[derive(Debug, Error)]
pub enum GateError {
    /// The wait exceeded its deadline.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// What a connection may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads and writes (primary, or anonymous read-write).
    ReadWrite,
    /// Reads only (anonymous).
    ReadOnly,
    /// Nothing but flip and disconnect (standby).
    Standby,
    /// Barrier raised: every new request fails with EPERM.
    Fenced,
    /// The server closes the connection.
    Closed,
}

/// What an operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Read access.
    Read,
    /// Write access.
    Write,
}

#[derive(Debug, Clone, Copy)]
struct GateState {
    access: Access,
    inflight: u64,
    /// The connection task has dropped its socket.
    gone: bool,
}

/// Per-connection gate, shared between the connection task and the lease runtime.
#[derive(Debug)]
pub struct Gate {
    state: watch::Sender<GateState>,
}

/// Proof of admission; dropping it ends the request's I/O stage.
#[derive(Debug)]
pub struct Admitted {
    gate: Arc<Gate>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.gate.state.send_modify(|s| s.inflight -= 1);
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Standby connection: data access needs a flip first.
    Standby,
    /// Read-only connection asked to write.
    ReadOnly,
    /// Barrier raised or connection closing.
    Fenced,
}

impl Gate {
    /// A gate with the given initial access.
    pub fn new(access: Access) -> Gate {
        Gate {
            state: watch::Sender::new(GateState {
                access,
                inflight: 0,
                gone: false,
            }),
        }
    }

    /// Current access.
    pub fn access(&self) -> Access {
        self.state.borrow().access
    }

    /// Requests in the I/O stage.
    pub fn inflight(&self) -> u64 {
        self.state.borrow().inflight
    }

    /// Admits a request needing `need`, or says why not.
    pub fn admit(self: &Arc<Self>, need: Need) -> Result<Admitted, Refusal> {
        let mut refusal = None;
        self.state.send_if_modified(|s| {
            let ok = match (s.access, need) {
                (Access::ReadWrite, _) | (Access::ReadOnly, Need::Read) => true,
                (Access::ReadOnly, Need::Write) => {
                    refusal = Some(Refusal::ReadOnly);
                    false
                }
                (Access::Standby, _) => {
                    refusal = Some(Refusal::Standby);
                    false
                }
                (Access::Fenced | Access::Closed, _) => {
                    refusal = Some(Refusal::Fenced);
                    false
                }
            };
            if ok {
                s.inflight += 1;
            }
            // Receivers only care about the count reaching zero, never about it rising.
            false
        });
        match refusal {
            None => Ok(Admitted { gate: self.clone() }),
            Some(r) => Err(r),
        }
    }

    /// Changes the access; returns how many requests were in flight at that instant.
    pub fn set_access(&self, access: Access) -> u64 {
        let mut n = 0;
        self.state.send_modify(|s| {
            // Closed is final.
            if s.access != Access::Closed {
                s.access = access;
            }
            n = s.inflight;
        });
        n
    }

    /// Waits until no admitted request remains.
    pub async fn drained(&self, limit: Duration) -> Result<(), GateError> {
        let mut rx = self.state.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|s| s.inflight == 0))
            .await
            .map(|_| ())
            .map_err(|_| GateError::Timeout(limit))
    }

    /// Resolves once the gate is closed (the connection task's signal to hang up).
    pub async fn closed(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|s| s.access == Access::Closed).await;
    }

    /// Marks the connection's socket as dropped.
    pub fn mark_gone(&self) {
        self.state.send_modify(|s| s.gone = true);
    }

    /// Waits until the connection's socket is dropped.
    pub async fn gone(&self, limit: Duration) -> Result<(), GateError> {
        let mut rx = self.state.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|s| s.gone))
            .await
            .map(|_| ())
            .map_err(|_| GateError::Timeout(limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_by_access() {
        let g = Arc::new(Gate::new(Access::ReadOnly));
        assert!(g.admit(Need::Read).is_ok());
        assert_eq!(g.admit(Need::Write).unwrap_err(), Refusal::ReadOnly);
        g.set_access(Access::Standby);
        assert_eq!(g.admit(Need::Read).unwrap_err(), Refusal::Standby);
        g.set_access(Access::ReadWrite);
        assert!(g.admit(Need::Write).is_ok());
        g.set_access(Access::Closed);
        g.set_access(Access::ReadWrite);
        assert_eq!(g.access(), Access::Closed);
        assert_eq!(g.admit(Need::Read).unwrap_err(), Refusal::Fenced);
    }

    #[tokio::test]
    async fn barrier_then_drain() {
        let g = Arc::new(Gate::new(Access::ReadWrite));
        let a = g.admit(Need::Write).unwrap();
        let b = g.admit(Need::Write).unwrap();
        assert_eq!(g.set_access(Access::Fenced), 2);
        assert_eq!(g.admit(Need::Write).unwrap_err(), Refusal::Fenced);
        drop(a);
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.drained(Duration::from_secs(30)).await });
        drop(b);
        waiter.await.unwrap().unwrap();
        assert_eq!(g.inflight(), 0);
    }
}
