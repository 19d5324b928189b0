//! Fault points for the fault matrix (`scripts/faults`): the daemons name the instants at
//! which a failure matters (each step of a flip, each phase of a migration), and a process
//! started with `VMHOP_CRASH_AT=NAME` kills itself with SIGKILL when it reaches the point
//! `NAME` (exactly as `kill -9` at that instant would, without a race), or with
//! `VMHOP_STALL_AT=NAME` stops itself there (SIGSTOP) so that a test can act (cut a link) while
//! it is frozen, then let it go on with SIGCONT. Without the variables (always, in production)
//! a point costs one load of a value read once.
//!
//! Points: storaged `flip.barrier`, `flip.drain`, `flip.disconnect`, `flip.persist`,
//! `flip.promote` (the steps of a flip, each right after it is done), `flip.acknowledge`
//! (the flip done, its answer not sent), `volume.create.file` (a new volume's file made, its
//! record not yet written) and `volume.delete.record` (a volume's record removed, its file not
//! yet), `cluster.lease.grant`, `cluster.lease.flip` and `cluster.lease.change` (a replicated
//! volume's master decided a lease change and has not written it to etcd); migrated `source.PHASE` and `destination.PHASE` right
//! after it recorded a phase (PHASE as its API names it, e.g. `source.flipping`); the VMM
//! `incoming.commit` (a destination read COMMIT and has not acted on it).

use nix::sys::signal::{raise, Signal};
use std::sync::OnceLock;

/// The variable naming the point at which the process kills itself.
pub const CRASH_AT: &str = "VMHOP_CRASH_AT";
/// The variable naming the point at which the process stops itself.
pub const STALL_AT: &str = "VMHOP_STALL_AT";

struct Armed {
    crash: Option<String>,
    stall: Option<String>,
}

fn armed() -> &'static Armed {
    static ARMED: OnceLock<Armed> = OnceLock::new();
    ARMED.get_or_init(|| {
        let var = |v| std::env::var(v).ok().filter(|p: &String| !p.is_empty());
        Armed {
            crash: var(CRASH_AT),
            stall: var(STALL_AT),
        }
    })
}

/// Whether this process was started with a fault point (callers that build a point's name
/// check this first).
pub fn is_armed() -> bool {
    let a = armed();
    a.crash.is_some() || a.stall.is_some()
}

/// The fault point `point`: kills or stops this process if it was started to.
pub fn point(point: &str) {
    let a = armed();
    if a.crash.as_deref() == Some(point) {
        tracing::error!(
            point,
            "fault point reached: killing this process ({CRASH_AT})"
        );
        // Nothing may run after this: no destructor, no flush, as under `kill -9`.
        let _ = raise(Signal::SIGKILL);
        std::process::abort();
    }
    if a.stall.as_deref() == Some(point) {
        tracing::warn!(
            point,
            "fault point reached: stopping this process ({STALL_AT})"
        );
        let _ = raise(Signal::SIGSTOP);
    }
}
