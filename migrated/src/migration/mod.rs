//! Live migration between two hosts, as the two migrated agents drive it: the durable record
//! both ends keep ([`record`]), the state machine of the host the guest leaves ([`source`]) and
//! that of the host it goes to ([`destination`]).
//!
//! The source drives until the hand-over; the destination follows, watches the source, and
//! makes the flip. Storage (storaged) is
//! the arbiter: a volume's lease is held by one host at a time and moves with a flip, and a
//! guest's volumes move together: each side changes them only with storaged's operations on
//! the whole set ([`leases`]), each conditional, so that exactly one side can win whatever is
//! cut:
//! - the flip (the destination's, or the source's when it hears nothing from the destination)
//!   promotes the destination only if the source still holds every volume at the epochs
//!   recorded when the migration began;
//! - the source's abort resumes the guest only after storaged ended the destination's standby
//!   leases on every volume (refused if the destination is primary on any), which also moves
//!   every epoch, so no flip can promote the destination afterwards;
//! - a side that gets no answer, or a refusal, reads the leases back before it decides: the
//!   destination primary on every volume means it won (the source stays paused and has it
//!   resume), anything else is retried or decided by the next conditional operation. While
//!   storaged cannot be reached the guest stays paused and the record says so.
//!
//! ```text
//!  operator      source migrated            source VMM        dest migrated / VMM     storaged
//!     | migrate ----> created: peer + VMM checks
//!     |               preparing ------------------------------> POST /v1/incoming
//!     |                                                          vmm run --incoming (standby)
//!     |                                                          preparing, precopy
//!     |               precopy --------------> POST migration/send ==== stream ====>
//!     |                 long poll GET /v1/migration?phase= until  long poll of its VMM's phase
//!     |                 handed-over                              until handed-over
//!     |                 GET /v1/incoming/{id} every second ----->
//!     |                 long poll GET /v1/incoming/{id}?wait_ms= (answered once it ended)
//!     |                                                   <------ GET /v1/migrations/{id}
//!     |                                                           (the watch, every 500 ms)
//!     |               handed-over, flipping                      group flip to itself -----> flip
//!     |                                                          resuming, completed
//!     |                 <------------------------------------- the long poll's answer
//!     |               leases read back: the destination's ---------------------------> leases
//!     |               flipped, cleanup -----> POST vm/shutdown
//!     |                 release the source's deactivated leases ---------------------> revoke
//!     |               completed
//! ```
//!
//! The destination flips as soon as its VMM holds the whole state, so that the guest's pause
//! waits for no call between the hosts. A source that does not learn the outcome within the
//! peer timeout asks for it (`POST /v1/incoming/{id}/complete`, which completes there as well);
//! one that gets no answer makes the same conditional flip itself, then has the destination
//! resume (`POST /v1/incoming/{id}/resume`).
//!
//! Each phase is written to the store before its action is taken, so a restarted migrated
//! ([`crate::recovery`]) knows what may have happened; the steps of the guest's pause are only
//! published, as recovery reads the leases instead (see [`source`] and [`destination`]'s
//! resume). Before `flipped` every failure aborts:
//! the destination's standby leases are revoked (so it can no longer take over), the
//! destination is told to abort and the source VMM resumes; unless storaged shows that the
//! destination won, and then the migration goes on to completion. From `flipped` on the guest
//! may only continue on the destination. A destination whose VMM holds the whole state flips
//! whether or not it still hears from the source.

pub mod destination;
pub mod leases;
pub mod record;
pub mod source;
