//! The REST control API's routes (HTTP/1 + JSON); the table of routes, the request and answer
//! types and the client are in `storaged_client::api` and `storaged_client::rest`.

use crate::lease::flip::{self, FlipTrigger};
use crate::registry::{Registry, RegistryError};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use storaged_client::api::{
    ArmedFlip, ErrorBody, FlipMode, FlipReport, FlipRequest, GroupFlipReport, GroupFlipRequest,
    GroupRevokeRequest, GroupRollbackRequest, LeaseView, RevokeRequest, RollbackRequest,
    VolumeAccess, VolumeConfig, VolumeInfo,
};
use thiserror::Error;

/// A failed API call, as the server maps it to HTTP.
#[derive(Debug, Error)]
#[error(transparent)]
pub struct ApiError(#[from] RegistryError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
            RegistryError::Exists(_)
            | RegistryError::Busy(..)
            | RegistryError::Lease(_)
            | RegistryError::NotAllowed(_)
            | RegistryError::Refused { .. } => StatusCode::CONFLICT,
            RegistryError::Duplicate(_) | RegistryError::NoVolumes => StatusCode::BAD_REQUEST,
            RegistryError::Volume(crate::volume::VolumeError::Config(_)) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let error = vmhop_common::error::chain(&self.0);
        (status, Json(ErrorBody { error })).into_response()
    }
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
        .route("/metrics", get(metrics))
        .route("/v1/volumes", get(list).post(create))
        .route("/v1/volumes/{id}", get(show).delete(delete))
        .route("/v1/volumes/{id}/access", put(set_access))
        .route("/v1/volumes/{id}/leases", get(leases))
        .route(
            "/v1/volumes/{id}/flip",
            post(flip_volume).delete(cancel_flip),
        )
        .route("/v1/volumes/{id}/rollback", post(rollback))
        .route("/v1/volumes/{id}/leases/revoke", post(revoke))
        .route("/v1/leases/flip", post(flip_group))
        .route("/v1/leases/revoke", post(revoke_group))
        .route("/v1/leases/rollback", post(rollback_group))
        .with_state(reg)
}

/// `GET /metrics`: the Prometheus exposition (see [`crate::metrics`]).
async fn metrics(State(reg): Reg) -> impl IntoResponse {
    let body = reg.metrics.encode(&reg.list());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        body,
    )
}

async fn list(State(reg): Reg) -> Json<Vec<VolumeInfo>> {
    Json(reg.list().iter().map(|v| v.info()).collect())
}

async fn create(State(reg): Reg, Json(cfg): Json<VolumeConfig>) -> ApiResult<impl IntoResponse> {
    let v = reg.create(cfg).await?;
    Ok((StatusCode::CREATED, Json(v.info())))
}

async fn set_access(
    State(reg): Reg,
    Path(id): Path<String>,
    Json(access): Json<VolumeAccess>,
) -> ApiResult<Json<VolumeInfo>> {
    let vol = reg.get(&id)?;
    reg.set_access(&vol, access).await?;
    Ok(Json(vol.info()))
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
            vmhop_common::faults::point("flip.acknowledge");
            Ok(Json(rep).into_response())
        }
        FlipMode::Armed => {
            let ms = req
                .timeout_ms
                .or(vol.config.flip_timeout_ms)
                .unwrap_or(30_000);
            flip::arm(&reg, &vol, req.to, Duration::from_millis(ms), req.migration).await?;
            let body = ArmedFlip {
                armed: true,
                timeout_ms: ms,
            };
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
    }
}

/// The query of `DELETE /v1/volumes/{id}/flip`.
#[derive(Deserialize)]
struct CancelQuery {
    migration: Option<String>,
}

async fn cancel_flip(
    State(reg): Reg,
    Path(id): Path<String>,
    Query(q): Query<CancelQuery>,
) -> ApiResult<Json<LeaseView>> {
    let vol = reg.get(&id)?;
    flip::cancel_armed(&vol, q.migration.as_deref()).await?;
    Ok(Json(vol.lease_view()))
}

async fn rollback(
    State(reg): Reg,
    Path(id): Path<String>,
    Json(req): Json<RollbackRequest>,
) -> ApiResult<Json<FlipReport>> {
    let vol = reg.get(&id)?;
    Ok(Json(
        flip::rollback_flip(&reg, &vol, req.epoch, &req.primary).await?,
    ))
}

async fn flip_group(
    State(reg): Reg,
    Json(req): Json<GroupFlipRequest>,
) -> ApiResult<Json<GroupFlipReport>> {
    let report = flip::flip_group(&reg, &req).await?;
    vmhop_common::faults::point("flip.acknowledge");
    Ok(Json(report))
}

async fn revoke_group(
    State(reg): Reg,
    Json(req): Json<GroupRevokeRequest>,
) -> ApiResult<Json<Vec<LeaseView>>> {
    Ok(Json(flip::revoke_group(&reg, &req).await?))
}

async fn rollback_group(
    State(reg): Reg,
    Json(req): Json<GroupRollbackRequest>,
) -> ApiResult<Json<GroupFlipReport>> {
    Ok(Json(flip::rollback_group(&reg, &req).await?))
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
