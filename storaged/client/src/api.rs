//! The REST API's request and answer types, shared by storaged (which serves them), its CLI,
//! migrated and the tests: a change here is a compile error on both sides of the wire.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | /v1/health | | `{"status":"ok"}` |
//! | GET | /v1/volumes | | `[VolumeInfo]` |
//! | POST | /v1/volumes | [`VolumeConfig`] | 201 [`VolumeInfo`] |
//! | GET | /v1/volumes/{id} | | [`VolumeInfo`] |
//! | DELETE | /v1/volumes/{id} | | 204 |
//! | PUT | /v1/volumes/{id}/access | [`VolumeAccess`] | [`VolumeInfo`] |
//! | GET | /v1/volumes/{id}/leases | | [`LeaseView`] |
//! | POST | /v1/volumes/{id}/flip | [`FlipRequest`] | [`FlipReport`] (or 202 [`ArmedFlip`]) |
//! | POST | /v1/volumes/{id}/rollback | | [`FlipReport`] |
//! | POST | /v1/volumes/{id}/leases/revoke | [`RevokeRequest`] | [`LeaseView`] |
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
}

/// Who may use a volume without the lease option (standard NBD tools).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Default time after which an armed flip completes by itself, in milliseconds.
    #[serde(default)]
    pub flip_timeout_ms: Option<u64>,
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
            flip_timeout_ms: None,
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
        Ok(())
    }
}

/// Who may use a volume: body of `PUT /v1/volumes/{id}/access`, which replaces both parts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// When a flip happens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlipMode {
    /// Right away; the answer is the flip report.
    #[default]
    Now,
    /// Armed: completes on the standby's first data command, or at the timeout.
    Armed,
}

/// Body of `POST /v1/volumes/{id}/flip`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
}

/// Answer to an armed flip.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmedFlip {
    /// Always true.
    pub armed: bool,
    /// Deadline in ms.
    pub timeout_ms: u64,
}

/// Body of `POST /v1/volumes/{id}/leases/revoke`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokeRequest {
    /// Host whose lease ends.
    pub host: String,
    /// Revoke only if the host's lease is in this state (409 otherwise, nothing changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only_if: Option<LeaseState>,
}

/// Body of an error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
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
