//! Live migration between two hosts, as the two migrated agents drive it: the durable record
//! both ends keep ([`record`]), the state machine of the host the guest leaves ([`source`]) and
//! that of the host it goes to ([`destination`]).
//!
//! The source drives; the destination follows and watches the source. Storage (storaged) is
//! the arbiter: a volume's lease is held by one host at a time and moves with a flip.
//!
//! ```text
//!  operator      source migrated            source VMM        dest migrated / VMM     storaged
//!     | migrate ----> created: peer + VMM checks
//!     |               preparing ------------------------------> POST /v1/incoming
//!     |                                                          vmm run --incoming (standby)
//!     |                                                          preparing, precopy
//!     |               precopy --------------> PUT migration/send ==== stream ====>
//!     |                 poll GET /v1/migration until handed-over
//!     |                 GET /v1/incoming/{id} every second ----->
//!     |                                                   <------ GET /v1/migrations/{id}
//!     |                                                           (the watch, every 500 ms)
//!     |               handed-over, flipping ----------------------------------------> flip (each volume)
//!     |               flipped, resuming ----------------------> POST /v1/incoming/{id}/resume
//!     |                                                          resuming, completed
//!     |               cleanup --------------> PUT vm/shutdown
//!     |                 release the source's deactivated leases ---------------------> revoke
//!     |               completed
//! ```
//!
//! Each phase is written to the store before its action is taken, so a restarted migrated
//! ([`crate::recovery`]) knows what may have happened. Before `flipped` every failure aborts:
//! volumes already flipped are rolled back, the destination's standby leases are revoked (so it
//! can no longer take over), the destination is told to abort and the source VMM resumes.
//! From `flipped` on the guest may only continue on the destination. A destination that loses
//! the source after its VMM holds the whole state takes the leases over itself.

pub mod destination;
pub mod record;
pub mod source;
