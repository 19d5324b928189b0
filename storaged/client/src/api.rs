//! The REST API's request and answer types, shared by storaged (which serves them), its CLI,
//! migrated and the tests: a change here is a compile error on both sides of the wire.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | /v1/health | | `{"status":"ok"}` |
//! | GET | /metrics | | Prometheus text format (storaged's `metrics` module) |
//! | GET | /v1/volumes | | `[VolumeInfo]` |
//! | POST | /v1/volumes | [`VolumeConfig`] | 201 [`VolumeInfo`] |
//! | GET | /v1/volumes/{id} | | [`VolumeInfo`] |
//! | DELETE | /v1/volumes/{id} | | 204 |
//! | PUT | /v1/volumes/{id}/access | [`VolumeAccess`] | [`VolumeInfo`] |
//! | GET | /v1/volumes/{id}/leases | | [`LeaseView`] |
//! | POST | /v1/volumes/{id}/flip | [`FlipRequest`] | [`FlipReport`] (or 202 [`ArmedFlip`]) |
//! | POST | /v1/volumes/{id}/rollback | [`RollbackRequest`] | [`FlipReport`] |
//! | POST | /v1/volumes/{id}/leases/revoke | [`RevokeRequest`] | [`LeaseView`] |
//! | DELETE | /v1/volumes/{id}/flip`[?migration=ID]` | | [`LeaseView`] (the armed flip cancelled) |
//! | POST | /v1/leases/flip | [`GroupFlipRequest`] | [`GroupFlipReport`] |
//! | POST | /v1/leases/revoke | [`GroupRevokeRequest`] | `[LeaseView]` |
//! | POST | /v1/leases/rollback | [`GroupRollbackRequest`] | [`GroupFlipReport`] |
//!
//! The `/v1/leases/*` routes change the leases of a set of volumes (a guest's) as one decision:
//! storaged takes the volumes' lease locks in name order, checks every volume's condition, and
//! applies and persists all the changes in one durable transaction before it answers, or
//! changes none (409, the error names the volume that refused). They are what a migration
//! coordinator uses, so that per-volume decisions can never split a guest between two hosts.
//!
//! Errors are [`ErrorBody`] with 400 (bad input), 401 (no or wrong cluster token), 404 (no
//! such volume), 409 (refused by the lease state machine, or busy) or 500. The client is
//! [`crate::rest::StoragedApi`].

pub use crate::protocol::FlipReport;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A volume configuration that cannot be used.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum VolumeConfigError {
    /// The volume name is not usable as a file name.
    #[error("invalid volume name {0:?}: use 1-64 of [A-Za-z0-9._-], not starting with '.'")]
    InvalidName(String),
    /// The size is zero or not a multiple of 512.
    #[error("invalid size {0}: must be a non-zero multiple of 512")]
    InvalidSize(u64),
    /// A host id of the access list is empty, too long or holds white space.
    #[error("invalid host id {0:?} in the volume's host list")]
    InvalidHost(String),
    /// The description is longer than NBD can carry.
    #[error("description of {0} bytes: at most {max} allowed", max = crate::protocol::MAX_STRING_LEN)]
    DescriptionTooLong(usize),
}

/// Who may use a volume without the lease option (standard NBD tools).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum AnonymousPolicy {
    /// Read-only, and only while no primary lease exists.
    #[default]
    ReadOnlyWithoutPrimary,
    /// Read-only, also while a primary exists.
    ReadOnly,
    /// Read-write while no primary lease exists (for imports with qemu-img and the like).
    ReadWriteWithoutPrimary,
    /// Refused.
    Deny,
}

/// A volume as the operator configured it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeConfig {
    /// Name, also the NBD export name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Access for clients without a lease.
    #[serde(default)]
    pub anonymous: AnonymousPolicy,
    /// The hosts that may hold leases on the volume (empty: any host of the cluster). A host
    /// not on the list gets no lease, not even standby, so it can never flip the volume.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// The first data command on a standby connection flips the lease to it.
    #[serde(default)]
    pub flip_on_first_access: bool,
    /// A standby connection may promote itself with `NBD_CMD_LEASE_FLIP`. Off (the default),
    /// only the control plane flips: the REST API, or a flip it armed for that standby.
    #[serde(default)]
    pub flip_over_nbd: bool,
    /// Default time after which an armed flip completes by itself, in milliseconds.
    #[serde(default)]
    pub flip_timeout_ms: Option<u64>,
    /// What the volume holds, for people (NBD clients see it as the export's description).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl VolumeConfig {
    /// A volume of `size` bytes with the defaults: the default anonymous policy, no flip on
    /// first access, no default flip deadline.
    pub fn new(name: impl Into<String>, size: u64) -> VolumeConfig {
        VolumeConfig {
            name: name.into(),
            size,
            anonymous: AnonymousPolicy::default(),
            hosts: Vec::new(),
            flip_on_first_access: false,
            flip_over_nbd: false,
            flip_timeout_ms: None,
            description: None,
        }
    }

    /// Who may use the volume: its access policy as configured.
    pub fn access(&self) -> VolumeAccess {
        VolumeAccess {
            anonymous: self.anonymous,
            hosts: self.hosts.clone(),
        }
    }

    /// Checks name, size and the host list.
    pub fn validate(&self) -> Result<(), VolumeConfigError> {
        self.access().validate()?;
        let ok = !self.name.is_empty()
            && self.name.len() <= 64
            && !self.name.starts_with('.')
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok {
            return Err(VolumeConfigError::InvalidName(self.name.clone()));
        }
        if self.size == 0 || !self.size.is_multiple_of(512) {
            return Err(VolumeConfigError::InvalidSize(self.size));
        }
        let description = self.description.as_deref().map_or(0, str::len);
        if description > crate::protocol::MAX_STRING_LEN {
            return Err(VolumeConfigError::DescriptionTooLong(description));
        }
        Ok(())
    }
}

/// Who may use a volume: body of `PUT /v1/volumes/{id}/access`, which replaces both parts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeAccess {
    /// Access for clients without a lease.
    #[serde(default)]
    pub anonymous: AnonymousPolicy,
    /// The hosts that may hold leases (empty: any host).
    #[serde(default)]
    pub hosts: Vec<String>,
}

impl VolumeAccess {
    /// Whether `host` may hold a lease.
    pub fn allows(&self, host: &str) -> bool {
        self.hosts.is_empty() || self.hosts.iter().any(|h| h == host)
    }

    /// Checks the host ids.
    pub fn validate(&self) -> Result<(), VolumeConfigError> {
        match self
            .hosts
            .iter()
            .find(|h| h.is_empty() || h.len() > 255 || h.chars().any(char::is_whitespace))
        {
            Some(bad) => Err(VolumeConfigError::InvalidHost(bad.clone())),
            None => Ok(()),
        }
    }
}

/// What `show`/`list` report about a volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct VolumeInfo {
    /// Configuration.
    #[serde(flatten)]
    pub config: VolumeConfig,
    /// Current epoch.
    pub epoch: u64,
    /// Open connections.
    pub connections: usize,
}

/// A lease as reported by the API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct LeaseEntry {
    /// Host id.
    pub host: String,
    /// Instance id.
    pub instance: String,
    /// State.
    pub state: LeaseState,
    /// Open connections of this holder.
    pub connections: usize,
}

/// The lease view of a volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct LeaseView {
    /// Volume.
    pub volume: String,
    /// Epoch.
    pub epoch: u64,
    /// Leases.
    pub leases: Vec<LeaseEntry>,
    /// Anonymous connections.
    pub anonymous_connections: usize,
    /// A flip is armed.
    pub flip_pending: bool,
    /// Rollback is possible.
    pub can_roll_back: bool,
    /// The armed flip, if one is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub armed: Option<ArmedFlipInfo>,
}

impl LeaseView {
    /// The state `host` holds on the volume, if any. A host may appear twice (deactivated for
    /// an old instance, standby for a new one): primary wins over standby over deactivated.
    pub fn state_of(&self, host: &str) -> Option<LeaseState> {
        let mine = || {
            self.leases
                .iter()
                .filter(|l| l.host == host)
                .map(|l| l.state)
        };
        [
            LeaseState::Primary,
            LeaseState::Standby,
            LeaseState::Deactivated,
        ]
        .into_iter()
        .find(|s| mine().any(|m| m == *s))
    }
}

/// Who holds a lease: a host and the instance (VM) on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Holder {
    /// Host id.
    pub host: String,
    /// Instance id.
    pub instance: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.host, self.instance)
    }
}

/// The state a holder has on a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    /// Sole read/write access.
    Primary,
    /// Connected or allowed to connect, no data access.
    Standby,
    /// Former primary, refused for good (until revoked by the control plane).
    Deactivated,
}

impl std::fmt::Display for LeaseState {
    /// The state's name on the wire.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            LeaseState::Primary => "primary",
            LeaseState::Standby => "standby",
            LeaseState::Deactivated => "deactivated",
        })
    }
}

/// When a flip happens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FlipMode {
    /// Right away; the answer is the flip report.
    #[default]
    Now,
    /// Armed: completes on the standby's first data command, or at the timeout.
    Armed,
}

/// Body of `POST /v1/volumes/{id}/flip`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FlipRequest {
    /// Host to promote (default: the only standby).
    #[serde(default)]
    pub to: Option<String>,
    /// Now or armed.
    #[serde(default)]
    pub mode: FlipMode,
    /// For armed flips: deadline in ms (default: the volume's `flip_timeout_ms`, else 30000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// For armed flips: the migration it belongs to (only that migration may cancel it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
}

/// Answer to an armed flip.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ArmedFlip {
    /// Always true.
    pub armed: bool,
    /// Deadline in ms.
    pub timeout_ms: u64,
}

/// Body of `POST /v1/volumes/{id}/leases/revoke`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RevokeRequest {
    /// Host whose lease ends.
    pub host: String,
    /// Revoke only if the host's lease is in this state (409 otherwise, nothing changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only_if: Option<LeaseState>,
}

/// Body of an error answer.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
    /// With `307 Temporary Redirect` (cluster mode, a node that is not the volume's master):
    /// the master's API address (`host:port`), where the same request is to be sent (the
    /// `Location` header names it as a URL too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<String>,
    /// With `421 Misdirected Request` (cluster mode, a change of a set of volumes mastered on
    /// different nodes): each volume's master API address (`host:port`); the same change, cut
    /// into one request per master, is to be sent to each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masters: Option<std::collections::BTreeMap<String, String>>,
    /// With `503 Service Unavailable` (cluster mode): true when the volume has no master now
    /// and is getting one (none elected yet, or this node's term just ended); nothing changed,
    /// and the same request may be made again in a moment (`Retry-After` says when).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub electing: bool,
}

// ---- Lease changes of a set of volumes, and rollbacks that name what they undo ----

/// A volume and an epoch of its lease table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeEpoch {
    /// The volume.
    pub volume: String,
    /// The epoch.
    pub epoch: u64,
}

/// Body of `POST /v1/leases/flip`: promote `to`'s standby lease on every volume, only if `from`
/// holds the primary lease on each at the epoch named (its lease is deactivated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupFlipRequest {
    /// The host that must be primary on every volume.
    pub from: String,
    /// The host whose standby lease becomes primary on every volume.
    pub to: String,
    /// The volumes, each with the epoch at which `from` must be primary.
    pub volumes: Vec<VolumeEpoch>,
    /// The migration this flip belongs to (logged with every lease change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
}

/// Answer of `POST /v1/leases/flip` and `POST /v1/leases/rollback`: each volume's report (its
/// new epoch, the requests drained on it; the step timings are the whole change's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupFlipReport {
    /// By volume.
    pub volumes: std::collections::BTreeMap<String, FlipReport>,
}

/// Body of `POST /v1/leases/revoke`: end `host`'s standby leases on every volume, only if
/// `host` is primary on none of them (and, when named, `primary` is primary on every one).
/// A volume where `host` holds no lease, or a deactivated one, keeps it as it is. Every
/// volume's epoch moves, so that a flip conditional on an earlier epoch
/// ([`GroupFlipRequest`]) fails from then on, even if `host` connects as standby again: after
/// this answer, `host` cannot become primary through such a flip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupRevokeRequest {
    /// The host whose standby leases end.
    pub host: String,
    /// The volumes.
    pub volumes: Vec<String>,
    /// A host that must hold the primary lease on every volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// The migration this revoke belongs to (logged with every lease change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
}

/// Body of `POST /v1/volumes/{id}/rollback`: undo the flip that made `primary` the primary at
/// `epoch`; refused (409) if the volume moved on since (another epoch or another primary).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RollbackRequest {
    /// The epoch the flip being undone produced.
    pub epoch: u64,
    /// The host that flip made primary.
    pub primary: String,
}

/// Body of `POST /v1/leases/rollback`: undo, on every volume, the flip that made `primary` the
/// primary at the epoch named, or on none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupRollbackRequest {
    /// The host the flips made primary.
    pub primary: String,
    /// The volumes, each with the epoch its flip produced.
    pub volumes: Vec<VolumeEpoch>,
    /// The migration this rollback belongs to (logged with every lease change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
}

/// An armed flip, as the lease view shows it. It fires only while the volume is at `epoch`:
/// any lease change (a flip, a rollback, a revoke) disarms it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ArmedFlipInfo {
    /// The standby host it promotes (none: the only standby).
    pub to: Option<String>,
    /// The migration it belongs to.
    pub migration: Option<String>,
    /// The epoch it was armed at.
    pub epoch: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sizes() {
        let mut c = VolumeConfig::new("vol-1.a_b", 1 << 20);
        assert!(c.validate().is_ok());
        for bad in ["", ".hidden", "a/b", "x y", &"n".repeat(65)] {
            c.name = bad.into();
            assert!(c.validate().is_err(), "{bad}");
        }
        c.name = "ok".into();
        c.size = 1000;
        assert!(c.validate().is_err());
    }
}
