//! The project's lease extension of NBD on the wire (specified in [`crate::protocol`]'s
//! module docs): the data of [`NBD_OPT_LEASE`], the `NBD_INFO_LEASE` item of a granted lease,
//! and the [`FlipReport`] that answers [`NBD_CMD_LEASE_FLIP`].

use crate::protocol::{
    header, reader, ProtocolError, FLIP_REPORT_LEN, LEASE_STATE_PRIMARY, LEASE_STATE_STANDBY,
    LEASE_VERSION, MAX_ID_LEN, NBD_INFO_LEASE,
};
#[cfg(doc)]
use crate::protocol::{NBD_CMD_LEASE_FLIP, NBD_OPT_LEASE};
use bytes::BufMut;

/// A lease state a client may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestedState {
    /// Sole read/write access.
    Primary,
    /// Connected, no data access until a flip.
    Standby,
}

impl RequestedState {
    /// Wire value.
    pub fn to_wire(self) -> u8 {
        match self {
            RequestedState::Primary => LEASE_STATE_PRIMARY,
            RequestedState::Standby => LEASE_STATE_STANDBY,
        }
    }
    /// From the wire value.
    pub fn from_wire(v: u8) -> Result<Self, ProtocolError> {
        match v {
            LEASE_STATE_PRIMARY => Ok(RequestedState::Primary),
            LEASE_STATE_STANDBY => Ok(RequestedState::Standby),
            _ => Err(ProtocolError::Invalid("lease state")),
        }
    }
}

/// Data of [`NBD_OPT_LEASE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseOption {
    /// The storage client's host.
    pub host: String,
    /// The instance (VM) on that host.
    pub instance: String,
    /// What it asks for.
    pub state: RequestedState,
    /// The epoch it believes current; 0 = any.
    pub expected_epoch: u64,
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID_LEN && !s.contains('\0')
}

impl LeaseOption {
    /// Encodes the option data.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.host.len() + self.instance.len());
        v.put_u16(LEASE_VERSION);
        v.put_u8(self.state.to_wire());
        v.put_u8(0);
        v.put_u64(self.expected_epoch);
        for id in [&self.host, &self.instance] {
            v.put_u16(id.len() as u16);
            v.put_slice(id.as_bytes());
        }
        v
    }

    /// Decodes and validates the option data.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = reader(buf, "lease option");
        let version = r.u16()?;
        if version != LEASE_VERSION {
            return Err(ProtocolError::Version(version));
        }
        let state = RequestedState::from_wire(r.u8()?)?;
        if r.u8()? != 0 {
            return Err(ProtocolError::Invalid("lease reserved byte"));
        }
        let expected_epoch = r.u64()?;
        let hl = r.u16()? as usize;
        let host = r.string(hl)?;
        let il = r.u16()? as usize;
        let instance = r.string(il)?;
        r.finish()?;
        if !valid_id(&host) || !valid_id(&instance) {
            return Err(ProtocolError::Invalid("host or instance id"));
        }
        Ok(LeaseOption {
            host,
            instance,
            state,
            expected_epoch,
        })
    }
}

/// Encodes the project `NBD_INFO_LEASE` item.
pub fn encode_info_lease(state: RequestedState, epoch: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(11);
    v.put_u16(NBD_INFO_LEASE);
    v.put_u8(state.to_wire());
    v.put_u64(epoch);
    v
}

/// Time each step of a flip took, in microseconds, and the resulting epoch.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
pub struct FlipReport {
    /// Epoch after the flip.
    pub epoch: u64,
    /// Deactivating the old primary and raising its barrier.
    pub deactivate_us: u64,
    /// Waiting for its admitted requests to finish.
    pub drain_us: u64,
    /// Disconnecting its connections.
    pub disconnect_us: u64,
    /// Writing the new lease table durably.
    pub persist_us: u64,
    /// Promoting the standby in memory.
    pub promote_us: u64,
    /// From the start of the flip to the acknowledgement.
    pub total_us: u64,
    /// Requests still in flight on the old primary when the barrier went up.
    pub drained_requests: u64,
}

impl FlipReport {
    /// Encodes the payload ([`FLIP_REPORT_LEN`] bytes).
    pub fn encode(&self) -> [u8; FLIP_REPORT_LEN as usize] {
        let fields = [
            self.epoch,
            self.deactivate_us,
            self.drain_us,
            self.disconnect_us,
            self.persist_us,
            self.promote_us,
            self.total_us,
            self.drained_requests,
        ];
        header(|w| fields.into_iter().for_each(|f| w.put_u64(f)))
    }
    /// Decodes the payload.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = reader(buf, "flip report");
        let rep = FlipReport {
            epoch: r.u64()?,
            deactivate_us: r.u64()?,
            drain_us: r.u64()?,
            disconnect_us: r.u64()?,
            persist_us: r.u64()?,
            promote_us: r.u64()?,
            total_us: r.u64()?,
            drained_requests: r.u64()?,
        };
        r.finish()?;
        Ok(rep)
    }
}
