//! migrated's calls to storaged's REST API: flip a volume's lease to a host, roll a flip back,
//! read the lease table, and end a host's standby lease. Each call has a deadline.

use hyper::Method;
use std::time::Duration;
use storaged::api::client::{ApiClient, ApiClientError};
use storaged::api::token::Token;
use storaged::api::{FlipMode, FlipRequest, RevokeRequest};
use storaged::lease::LeaseState;
use storaged::protocol::FlipReport;
use storaged::registry::LeaseView;
use thiserror::Error;

/// Deadline of one call (a flip waits for the old primary's admitted requests).
pub const STORAGED_TIMEOUT: Duration = Duration::from_secs(60);

/// A failed storaged call.
#[derive(Debug, Error)]
pub enum LeaseError {
    /// storaged answered an error or could not be reached.
    #[error("storaged {0} {1}")]
    Api(&'static str, String, #[source] ApiClientError),
    /// No answer in time.
    #[error("storaged did not answer {0} {1} within {2:?}")]
    Timeout(&'static str, String, Duration),
}

/// A storaged REST client.
#[derive(Debug, Clone)]
pub struct Leases {
    api: ApiClient,
}

impl Leases {
    /// A client for storaged's API at `addr`, sending `token` when storaged requires one.
    pub fn new(addr: &str, token: Option<&Token>) -> Leases {
        Leases {
            api: ApiClient::new(addr).with_token(token.cloned()),
        }
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
        volume: &str,
        path: String,
        body: Option<&(impl serde::Serialize + Sync)>,
    ) -> Result<T, LeaseError> {
        match tokio::time::timeout(STORAGED_TIMEOUT, self.api.call(Method::POST, &path, body)).await
        {
            Ok(r) => r.map_err(|e| LeaseError::Api(what, volume.into(), e)),
            Err(_) => Err(LeaseError::Timeout(what, volume.into(), STORAGED_TIMEOUT)),
        }
    }

    /// Promotes `host`'s standby lease on `volume` (the old primary is deactivated).
    pub async fn flip(&self, volume: &str, host: &str) -> Result<FlipReport, LeaseError> {
        let req = FlipRequest {
            to: Some(host.to_string()),
            mode: FlipMode::Now,
            timeout_ms: None,
        };
        self.call(
            "flip",
            volume,
            format!("/v1/volumes/{volume}/flip"),
            Some(&req),
        )
        .await
    }

    /// Restores the lease table from before the last flip.
    pub async fn rollback(&self, volume: &str) -> Result<FlipReport, LeaseError> {
        self.call(
            "rollback",
            volume,
            format!("/v1/volumes/{volume}/rollback"),
            None::<&()>,
        )
        .await
    }

    /// Ends every lease `host` holds on `volume`; with `only_if`, only a lease in that state
    /// (storaged decides under the volume's lease lock and refuses otherwise).
    pub async fn revoke(
        &self,
        volume: &str,
        host: &str,
        only_if: Option<LeaseState>,
    ) -> Result<LeaseView, LeaseError> {
        let req = RevokeRequest {
            host: host.to_string(),
            only_if,
        };
        self.call(
            "revoke",
            volume,
            format!("/v1/volumes/{volume}/leases/revoke"),
            Some(&req),
        )
        .await
    }

    /// The lease table of `volume`.
    pub async fn view(&self, volume: &str) -> Result<LeaseView, LeaseError> {
        let path = format!("/v1/volumes/{volume}/leases");
        match tokio::time::timeout(
            STORAGED_TIMEOUT,
            self.api.call(Method::GET, &path, None::<&()>),
        )
        .await
        {
            Ok(r) => r.map_err(|e| LeaseError::Api("leases", volume.into(), e)),
            Err(_) => Err(LeaseError::Timeout(
                "leases",
                volume.into(),
                STORAGED_TIMEOUT,
            )),
        }
    }

    /// The state `host` holds on `volume`, if any.
    pub async fn state_of(
        &self,
        volume: &str,
        host: &str,
    ) -> Result<Option<LeaseState>, LeaseError> {
        let v = self.view(volume).await?;
        let mine = || v.leases.iter().filter(|l| l.host == host).map(|l| l.state);
        // A host may appear twice (deactivated for an old instance, standby for a new one).
        Ok([
            LeaseState::Primary,
            LeaseState::Standby,
            LeaseState::Deactivated,
        ]
        .into_iter()
        .find(|s| mine().any(|m| m == *s)))
    }
}
