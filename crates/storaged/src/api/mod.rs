//! The REST control API (HTTP/1 + JSON) and its client.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | /v1/health | | `{"status":"ok"}` |
//! | GET | /v1/volumes | | `[VolumeInfo]` |
//! | POST | /v1/volumes | `VolumeConfig` | 201 `VolumeInfo` |
//! | GET | /v1/volumes/{id} | | `VolumeInfo` |
//! | DELETE | /v1/volumes/{id} | | 204 |
//! | GET | /v1/volumes/{id}/leases | | `LeaseView` |
//! | POST | /v1/volumes/{id}/flip | `FlipRequest` | `FlipReport` (or 202 when armed) |
//! | POST | /v1/volumes/{id}/rollback | | `FlipReport` |
//! | POST | /v1/volumes/{id}/leases/revoke | `RevokeRequest` | `LeaseView` |
//!
//! Errors are `{"error": "..."}` with 400 (bad input), 404 (no such volume), 409 (refused by
//! the lease state machine or busy) or 500.

pub mod client;
pub mod token;

use crate::flip::{self, FlipTrigger};
use crate::lease::LeaseState;
use crate::protocol::FlipReport;
use crate::registry::{LeaseView, Registry, RegistryError, VolumeInfo};
use crate::volume::VolumeConfig;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// A failed API call, as the server maps it to HTTP.
#[derive(Debug, Error)]
#[error(transparent)]
pub struct ApiError(#[from] RegistryError);

/// Body of an error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
            RegistryError::Exists(_) | RegistryError::Busy(..) | RegistryError::Lease(_) => {
                StatusCode::CONFLICT
            }
            RegistryError::Volume(crate::volume::VolumeError::InvalidName(_))
            | RegistryError::Volume(crate::volume::VolumeError::InvalidSize(_)) => {
                StatusCode::BAD_REQUEST
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut msg = self.0.to_string();
        let mut src = std::error::Error::source(&self.0);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        (status, Json(ErrorBody { error: msg })).into_response()
    }
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

type Reg = State<Arc<Registry>>;
type ApiResult<T> = Result<T, ApiError>;

/// The API's routes.
pub fn router(reg: Arc<Registry>) -> Router {
    Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/v1/volumes", get(list).post(create))
        .route("/v1/volumes/{id}", get(show).delete(delete))
        .route("/v1/volumes/{id}/leases", get(leases))
        .route("/v1/volumes/{id}/flip", post(flip_volume))
        .route("/v1/volumes/{id}/rollback", post(rollback))
        .route("/v1/volumes/{id}/leases/revoke", post(revoke))
        .with_state(reg)
}

async fn list(State(reg): Reg) -> Json<Vec<VolumeInfo>> {
    Json(reg.list().iter().map(|v| v.info()).collect())
}

async fn create(State(reg): Reg, Json(cfg): Json<VolumeConfig>) -> ApiResult<impl IntoResponse> {
    let v = reg.create(cfg).await?;
    Ok((StatusCode::CREATED, Json(v.info())))
}

async fn show(State(reg): Reg, Path(id): Path<String>) -> ApiResult<Json<VolumeInfo>> {
    Ok(Json(reg.get(&id)?.info()))
}

async fn delete(State(reg): Reg, Path(id): Path<String>) -> ApiResult<StatusCode> {
    reg.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn leases(State(reg): Reg, Path(id): Path<String>) -> ApiResult<Json<LeaseView>> {
    Ok(Json(reg.get(&id)?.lease_view()))
}

async fn flip_volume(
    State(reg): Reg,
    Path(id): Path<String>,
    body: Option<Json<FlipRequest>>,
) -> ApiResult<Response> {
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let vol = reg.get(&id)?;
    match req.mode {
        FlipMode::Now => {
            let rep = flip::flip(&reg, &vol, req.to.as_deref(), FlipTrigger::Api).await?;
            Ok(Json(rep).into_response())
        }
        FlipMode::Armed => {
            // Validate now so that a flip that cannot happen is refused at once.
            vol.table()
                .flip(req.to.as_deref())
                .map_err(RegistryError::from)?;
            let ms = req
                .timeout_ms
                .or(vol.config.flip_timeout_ms)
                .unwrap_or(30_000);
            flip::arm(&reg, &vol, req.to, Duration::from_millis(ms));
            let body = ArmedFlip {
                armed: true,
                timeout_ms: ms,
            };
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
    }
}

async fn rollback(State(reg): Reg, Path(id): Path<String>) -> ApiResult<Json<FlipReport>> {
    let vol = reg.get(&id)?;
    Ok(Json(flip::rollback(&reg, &vol).await?))
}

async fn revoke(
    State(reg): Reg,
    Path(id): Path<String>,
    Json(req): Json<RevokeRequest>,
) -> ApiResult<Json<LeaseView>> {
    let vol = reg.get(&id)?;
    flip::revoke(&reg, &vol, &req.host, req.only_if).await?;
    Ok(Json(vol.lease_view()))
}
