//! The source side: one thread per migration, started by `POST /v1/migration/send`.
//!
//! Pre-copy runs beside the guest; the thread asks the VM loop to pause the guest and save
//! its state ([`crate::vm::VmEvent::MigrationStop`]) and tells it how it ended
//! ([`crate::vm::VmEvent::MigrationEnded`]), so that every vCPU and device change stays in
//! the loop.
//!
//! The phases of the sequence in [`super`], one module each, in order: `handshake`
//! (connect, HELLO), `precopy` (the full pass and the dirty rounds, with the `throttle`),
//! `stopcopy` (SYNC, the pause, the last pages and STATE) and `commit` (COMMIT,
//! RESUMED). `pages` turns guest memory into PAGES frames for the first three.

mod commit;
mod handshake;
mod pages;
mod precopy;
mod stopcopy;
mod throttle;

use super::dirty::DirtyLog;
use super::transport::{StreamTls, TransportError};
use super::wire::WireError;
use super::{update, Phase, SendParams, SharedStatus};
use crate::memory::GuestMem;
use crate::persist::Shape;
use crate::vcpu::{wall_us, VcpuKicker};
use crate::vm::{VmError, VmEvent};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use thiserror::Error;

/// Why a migration did not hand the guest over.
#[derive(Debug, Error)]
pub enum SendError {
    /// `POST /v1/migration/abort`.
    #[error("aborted on request")]
    Aborted,
    /// The destination's address does not resolve.
    #[error("destination {0}")]
    Resolve(String, #[source] std::io::Error),
    /// The destination's address resolves to nothing.
    #[error("destination {0}: no address")]
    NoAddress(String),
    /// The destination did not take the connection.
    #[error("connect to {0}")]
    Connect(SocketAddr, #[source] std::io::Error),
    /// The TLS session with the destination could not be set up (it is not who it must be, or
    /// refused this host).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The stream could not be set up or written.
    #[error("migration stream")]
    Stream(#[source] std::io::Error),
    /// A frame could not be written or read, or was not the one expected.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The destination answered HELLO with this reason.
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    /// Dirty logging could not be turned on.
    #[error("turn on dirty logging")]
    DirtyLogStart(#[source] super::dirty::DirtyError),
    /// The dirty log could not be read.
    #[error("read the dirty log")]
    DirtyLog(#[source] super::dirty::DirtyError),
    /// Guest memory could not be read at this address.
    #[error("read guest memory at {0:#x}")]
    ReadGuest(u64, #[source] vm_memory::GuestMemoryError),
    /// The VM loop is gone.
    #[error("the VM is shutting down")]
    VmGone,
    /// The VM loop did not answer the stop-and-copy in time.
    #[error("the VM did not pause for the stop-and-copy")]
    StopTimeout,
    /// The VM loop could not pause the guest and save its state.
    #[error("pause and save the VM")]
    Stop(#[source] VmError),
    /// The destination answered STATE with this reason.
    #[error("the destination could not load the state: {0}")]
    NotLoaded(String),
    /// The destination's VM could not take the guest at COMMIT, for this reason.
    #[error("the destination could not take the guest: {0}")]
    NotCommitted(String),
    /// Something failed once COMMIT was on its way: the destination may hold the guest, so it
    /// stays paused here (see [`Outcome::Undecided`]).
    #[error("the destination did not confirm COMMIT (it may hold the guest; the guest stays paused here until the migration is aborted)")]
    Unconfirmed(#[source] Box<SendError>),
}

/// What the VM loop hands over when the guest is paused for the stop-and-copy.
pub struct StopCopy {
    /// The state envelope.
    pub state: Vec<u8>,
    /// Wall-clock microseconds when the last vCPU paused.
    pub paused_at_us: u64,
}

/// How a migration ended, for the VM loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The destination runs the guest (`auto`), or has it and waits (`wait`): the source
    /// stays paused.
    HandedOver,
    /// Failed or aborted before COMMIT: the source runs the guest again.
    NotHandedOver,
    /// Failed once COMMIT was on its way, unconfirmed: the destination may hold the guest. The
    /// source stays paused; only `POST /v1/migration/abort` (once the caller knows that the
    /// destination cannot run it) runs it here again.
    Undecided,
}

/// Everything the thread needs.
pub struct SourceCtx {
    /// The request.
    pub params: SendParams,
    /// VM name.
    pub name: String,
    /// VM shape.
    pub shape: Shape,
    /// Guest memory.
    pub mem: Arc<GuestMem>,
    /// The memory is a private (copy-on-write) mapping of a snapshot file rather than a
    /// shared memfd: pages the guest wrote since the restore are not in the file.
    pub private_memory: bool,
    /// Dirty tracking.
    pub dirty: DirtyLog,
    /// Shared progress.
    pub status: SharedStatus,
    /// Set by `POST /v1/migration/abort`.
    pub abort: Arc<AtomicBool>,
    /// The stream, for the loop to shut down on abort.
    pub stream: Arc<Mutex<Option<TcpStream>>>,
    /// To the VM loop.
    pub events: Sender<VmEvent>,
    /// The vCPUs, for the throttle.
    pub kickers: Vec<VcpuKicker>,
    /// This host's certificates: the stream runs in TLS (`None`: plaintext).
    pub tls: Option<StreamTls>,
}

/// Runs a migration to its end and reports the outcome to the VM loop.
pub fn run(ctx: SourceCtx) {
    let started = Instant::now();
    let result = send(&ctx, started);
    if let Err(e) = ctx.dirty.stop() {
        tracing::warn!(error = %e, "turning the dirty log off");
    }
    let outcome = match result {
        Ok(()) => Outcome::HandedOver,
        Err(e) => {
            let aborted = ctx.abort.load(Ordering::SeqCst);
            let reason = vmhop_common::error::chain(&e);
            update(&ctx.status, |s| {
                s.phase = if aborted {
                    Phase::Aborted
                } else {
                    Phase::Failed
                };
                s.error = Some(reason.clone());
                s.total_ms = started.elapsed().as_millis() as u64;
            });
            if matches!(e, SendError::Unconfirmed(_)) {
                tracing::error!(error = %reason,
                    "migration undecided: the guest stays paused here until the migration is aborted");
                Outcome::Undecided
            } else if aborted {
                tracing::warn!(%reason, "migration aborted; the guest stays here");
                Outcome::NotHandedOver
            } else {
                tracing::error!(error = %reason, "migration failed; the guest stays here");
                Outcome::NotHandedOver
            }
        }
    };
    let _ = ctx.events.send(VmEvent::MigrationEnded(outcome));
}

fn check_abort(ctx: &SourceCtx) -> Result<(), SendError> {
    if ctx.abort.load(Ordering::SeqCst) {
        return Err(SendError::Aborted);
    }
    Ok(())
}

/// The phases in order; any error before COMMIT leaves the guest here, any after it is
/// [`SendError::Unconfirmed`].
fn send(ctx: &SourceCtx, started: Instant) -> Result<(), SendError> {
    let started_at_us = wall_us();
    let mut link = handshake::connect(ctx)?;
    let pre = precopy::run(ctx, &mut link, started)?;
    let stopped = stopcopy::run(ctx, &mut link, pre)?;
    commit::run(ctx, &mut link, stopped, started, started_at_us)
}
