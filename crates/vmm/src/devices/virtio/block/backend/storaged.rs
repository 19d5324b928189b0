//! A storaged volume over NBD, opened with a lease through storaged's async client.
//!
//! The connection is made once, when the VM is built: a volume another host holds as
//! primary, or one this host was deactivated on, is refused there with the server's reason,
//! before the guest runs. Requests are pipelined on the one connection (the client allows
//! any number in flight; replies complete out of order). A request larger than the server's
//! maximum is split. If the connection drops, requests fail with I/O errors that the guest
//! sees; reconnecting (with the lease logic) belongs to the migration work.

use super::BackendError;
use crate::config::StoragedDiskConfig;
use storaged::client::{Client, ClientConfig, LeaseSpec};
use storaged::protocol::{
    RequestedState, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES,
};

/// A connected volume.
#[derive(Debug)]
pub struct StoragedBackend {
    client: Client,
    max: u64,
}

impl StoragedBackend {
    /// Connects to the volume with the configured lease. Must run inside the tokio runtime
    /// that will serve the I/O (the client's reader task lives there).
    pub async fn connect(
        cfg: &StoragedDiskConfig,
        vm_name: &str,
    ) -> Result<StoragedBackend, BackendError> {
        let state = match cfg.lease.as_str() {
            "standby" => RequestedState::Standby,
            _ => RequestedState::Primary,
        };
        let instance = cfg
            .instance_id
            .clone()
            .unwrap_or_else(|| vm_name.to_string());
        let client_cfg = ClientConfig::new(vec![cfg.address.clone()], cfg.volume.clone())
            .with_lease(LeaseSpec {
                host: cfg.host_id.clone(),
                instance,
                state,
                expected_epoch: 0,
            });
        let client = Client::connect(&client_cfg).await?;
        tracing::info!(
            volume = %cfg.volume,
            host = %cfg.host_id,
            lease = ?client.lease(),
            size = client.size(),
            "storaged volume connected"
        );
        let max = u64::from(client.max_request().max(4096));
        Ok(StoragedBackend { client, max })
    }

    pub(super) fn size(&self) -> u64 {
        self.client.size()
    }

    pub(super) fn read_only(&self) -> bool {
        self.client.flags() & NBD_FLAG_READ_ONLY != 0
    }

    pub(super) fn supports_discard(&self) -> bool {
        let f = self.client.flags();
        f & NBD_FLAG_SEND_TRIM != 0 && f & NBD_FLAG_SEND_WRITE_ZEROES != 0
    }

    /// Splits `offset..offset+len` into pieces the server accepts.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let max = self.max;
        (0..len.div_ceil(max)).map(move |i| {
            let at = i * max;
            (offset + at, (len - at).min(max))
        })
    }

    pub(super) async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, BackendError> {
        if len as u64 <= self.max {
            return Ok(self.client.read(offset, len).await?);
        }
        let mut out = Vec::with_capacity(len);
        for (at, n) in self.pieces(offset, len as u64) {
            out.extend(self.client.read(at, n as usize).await?);
        }
        Ok(out)
    }

    pub(super) async fn write(&self, offset: u64, data: Vec<u8>) -> Result<(), BackendError> {
        if data.len() as u64 <= self.max {
            return Ok(self.client.write(offset, data, false).await?);
        }
        let pieces: Vec<_> = self.pieces(offset, data.len() as u64).collect();
        for (at, n) in pieces {
            let start = (at - offset) as usize;
            let piece = data[start..start + n as usize].to_vec();
            self.client.write(at, piece, false).await?;
        }
        Ok(())
    }

    pub(super) async fn flush(&self) -> Result<(), BackendError> {
        Ok(self.client.flush().await?)
    }

    pub(super) async fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        for (at, n) in self.pieces(offset, len) {
            self.client.trim(at, n as u32).await?;
        }
        Ok(())
    }

    pub(super) async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        for (at, n) in self.pieces(offset, len) {
            // no_hole: the device reports write_zeroes_may_unmap = 0.
            self.client.write_zeroes(at, n as u32, true, false).await?;
        }
        Ok(())
    }
}
