//! Leases: who may use a volume, and how the primary lease moves from one host to another.
//!
//! States of a host on a volume:
//! ```text
//!   (none) --grant Primary (no primary yet)------------------> Primary
//!   (none) --grant Standby-----------------------------------> Standby
//!   Standby --flip----> Primary        (old primary --flip--> Deactivated)
//!   Primary | Standby | Deactivated --revoke--> (none)   ("terminated")
//!   Standby --revoke standby (group)--> (none), and the epoch moves even where nothing ended
//!   table after a flip to H at epoch E --rollback naming (E, H)--> the table before that flip
//!                                         (epoch still increases; refused once it moved on)
//! ```
//! Invariants: at most one primary; a host is in at most one of primary / standby /
//! deactivated; the epoch never decreases and grows on every change of the primary.
//!
//! - [`table`] decides: the lease table of one volume and its transitions, as pure data;
//! - [`flip`] applies them to the live connections, persists them and logs them (the flip,
//!   rollback, revoke, armed flips), for one volume or for a set of volumes as one decision;
//! - [`gate`] is the per-connection barrier a flip raises and drains;
//! - [`expiry`] removes standby leases whose hosts went away.
//!
//! Every change is one structured event line on the `storaged::lease` tracing target.

pub mod expiry;
pub mod flip;
pub mod gate;
pub mod table;

pub use table::{FlipPlan, LeaseError, LeaseRequest, LeaseTable};
