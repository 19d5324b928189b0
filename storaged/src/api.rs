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
            RegistryError::Duplicate(_) | RegistryError::NoVolumes | RegistryError::MixedSet(_) => {
                StatusCode::BAD_REQUEST
            }
            RegistryError::NotMaster { .. }
            | RegistryError::Deposed { .. }
            | RegistryError::Etcd(_)
            | RegistryError::EtcdUnavailable(_)
            | RegistryError::EtcdUnreadable(_) => StatusCode::SERVICE_UNAVAILABLE,
            RegistryError::SplitMasters(_) => StatusCode::MISDIRECTED_REQUEST,
            RegistryError::Volume(crate::volume::VolumeError::Config(_)) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let error = vmhop_common::error::chain(&self.0);
        let masters = match &self.0 {
            RegistryError::SplitMasters(m) => Some(
                m.iter()
                    .map(|(volume, hint)| (volume.clone(), hint.api.clone()))
                    .collect(),
            ),
            _ => None,
        };
        // Cluster mode: a change sent to a node that is not the volume's master goes to the
        // master (see `locate_master`, which adds the Location header).
        if let RegistryError::NotMaster {
            master: Some(m), ..
        } = &self.0
        {
            let body = ErrorBody {
                error,
                redirect: Some(m.api.clone()),
                masters: None,
                electing: false,
            };
            let mut r = (StatusCode::TEMPORARY_REDIRECT, Json(body)).into_response();
            r.extensions_mut().insert(MasterApi(m.api.clone()));
            return r;
        }
        // No master now, one to come: the request may be made again shortly.
        let electing = matches!(
            &self.0,
            RegistryError::NotMaster { master: None, .. } | RegistryError::Deposed { .. }
        );
        let body = ErrorBody {
            error,
            redirect: None,
            masters,
            electing,
        };
        let mut r = (status, Json(body)).into_response();
        if electing {
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        r
    }
}

/// The master's API address, on a redirect answer.
#[derive(Clone)]
struct MasterApi(String);

/// Adds `Location: http://MASTER/PATH` to redirect answers.
async fn locate_master(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_string(), |p| p.to_string());
    let mut r = next.run(req).await;
    if let Some(MasterApi(api)) = r.extensions().get::<MasterApi>().cloned() {
        if let Ok(v) = axum::http::HeaderValue::from_str(&format!("http://{api}{path}")) {
            r.headers_mut().insert(axum::http::header::LOCATION, v);
        }
    }
    r
}

/// The volume `id`, to change here. Cluster mode: a lease change is the master's to make; a
/// node that is not the volume's master, with a copy or without, refuses with the master's
/// address (a redirect).
async fn changed_here(reg: &Registry, id: &str) -> Result<Arc<crate::volume::Volume>, ApiError> {
    let vol = reg.find(id).await?;
    if vol.role.refuses_clients() {
        return Err(crate::registry::not_master(&vol).await.into());
    }
    Ok(vol)
}

/// Cluster mode: a change of the set of volumes `names` is this node's to make when it masters
/// every one of them. When one other node masters them all, the request goes there (a
/// redirect); when they are mastered on different nodes, the answer names each volume's master
/// ([`RegistryError::SplitMasters`]) so that the client sends each master its part. A volume
/// whose master is not known yet refuses as [`changed_here`] does (retry later).
async fn names_mastered_here(reg: &Registry, names: &[&str]) -> Result<(), ApiError> {
    let mut masters = Vec::with_capacity(names.len());
    let mut here = None;
    let mut elsewhere = None;
    for name in names {
        let refusal = match reg.find(name).await {
            Ok(v) if !v.role.refuses_clients() => {
                if let Some(c) = v.role.get().cluster() {
                    here = Some(name);
                    masters.push((name.to_string(), c.hint()));
                }
                continue;
            }
            Ok(v) => crate::registry::not_master(&v).await,
            Err(e) => e,
        };
        match refusal {
            RegistryError::NotMaster {
                volume,
                master: Some(m),
            } => {
                elsewhere.get_or_insert_with(|| RegistryError::NotMaster {
                    volume: volume.clone(),
                    master: Some(m.clone()),
                });
                masters.push((volume, m));
            }
            // Unknown, not elected yet, or etcd out of reach: the volume's own answer.
            e => return Err(e.into()),
        }
    }
    let mut nodes: Vec<&str> = masters.iter().map(|(_, m)| m.node.as_str()).collect();
    nodes.sort_unstable();
    nodes.dedup();
    match (here, elsewhere) {
        (_, None) => Ok(()),
        (None, Some(redirect)) if nodes.len() == 1 => Err(redirect.into()),
        _ => Err(RegistryError::SplitMasters(masters).into()),
    }
}

type Reg = State<Arc<Registry>>;
type ApiResult<T> = Result<T, ApiError>;

/// The API's routes.
pub fn router(reg: Arc<Registry>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
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
        .layer(axum::middleware::from_fn(locate_master))
        .with_state(reg)
}

/// `GET /metrics`: the Prometheus exposition (see [`crate::metrics`]).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "metrics",
    responses(vmhop_common::openapi::PrometheusText)
)]
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

/// The answer of `GET /v1/health`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok` while the server answers.
    pub status: &'static str,
}

/// Whether the server answers.
#[utoipa::path(get, path = "/v1/health", tag = "storaged",
    responses((status = 200, description = "The server answers", body = Health)))]
async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Every volume.
#[utoipa::path(get, path = "/v1/volumes", tag = "volumes",
    responses((status = 200, description = "The volumes", body = Vec<VolumeInfo>)))]
async fn list(State(reg): Reg) -> Json<Vec<VolumeInfo>> {
    Json(reg.list().iter().map(|v| v.info()).collect())
}

/// Creates a sparse volume.
#[utoipa::path(post, path = "/v1/volumes", tag = "volumes", request_body = VolumeConfig,
    responses((status = 201, description = "Created", body = VolumeInfo),
        (status = 400, description = "Invalid settings", body = ErrorBody),
        (status = 409, description = "A volume of that name exists", body = ErrorBody)))]
async fn create(State(reg): Reg, Json(cfg): Json<VolumeConfig>) -> ApiResult<impl IntoResponse> {
    let v = reg.create(cfg).await?;
    Ok((StatusCode::CREATED, Json(v.info())))
}

/// Sets who may use the volume: the hosts that may hold leases and anonymous access.
#[utoipa::path(put, path = "/v1/volumes/{id}/access", tag = "volumes", params(("id" = String, Path, description = "The volume's name")), request_body = VolumeAccess,
    responses((status = 200, description = "The volume with its new policy", body = VolumeInfo),
        NoSuchVolume, LeaseRefused))]
async fn set_access(
    State(reg): Reg,
    Path(id): Path<String>,
    Json(access): Json<VolumeAccess>,
) -> ApiResult<Json<VolumeInfo>> {
    let vol = reg.get(&id)?;
    reg.set_access(&vol, access).await?;
    Ok(Json(vol.info()))
}

/// One volume.
#[utoipa::path(get, path = "/v1/volumes/{id}", tag = "volumes", params(("id" = String, Path, description = "The volume's name")),
    responses((status = 200, description = "The volume", body = VolumeInfo), NoSuchVolume))]
async fn show(State(reg): Reg, Path(id): Path<String>) -> ApiResult<Json<VolumeInfo>> {
    // Cluster mode: a node without a copy sends the client to the volume's master.
    let vol = reg.find(&id).await?;
    let table = crate::cluster::leases::current(&vol).await?;
    Ok(Json(vol.info_with(&table)))
}

/// Deletes a volume that no lease holder uses.
#[utoipa::path(delete, path = "/v1/volumes/{id}", tag = "volumes", params(("id" = String, Path, description = "The volume's name")),
    responses((status = 204, description = "Deleted"), NoSuchVolume,
        (status = 409, description = "The volume is in use", body = ErrorBody)))]
async fn delete(State(reg): Reg, Path(id): Path<String>) -> ApiResult<StatusCode> {
    reg.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The volume's lease table.
#[utoipa::path(get, path = "/v1/volumes/{id}/leases", tag = "leases", params(("id" = String, Path, description = "The volume's name")),
    responses((status = 200, description = "The lease table", body = LeaseView), NoSuchVolume))]
async fn leases(State(reg): Reg, Path(id): Path<String>) -> ApiResult<Json<LeaseView>> {
    // Cluster mode: a node without a copy sends the client to the volume's master.
    let vol = reg.find(&id).await?;
    let table = crate::cluster::leases::current(&vol).await?;
    Ok(Json(vol.lease_view_of(table)))
}

/// Flips the volume to its standby now, or arms a flip that the standby's first access (or
/// the deadline) completes.
#[utoipa::path(post, path = "/v1/volumes/{id}/flip", tag = "leases", params(("id" = String, Path, description = "The volume's name")), request_body(content = Option<FlipRequest>, description = "Without a body: flip now to the only standby"),
    responses((status = 200, description = "Flipped", body = FlipReport),
        (status = 202, description = "Armed", body = ArmedFlip), NoSuchVolume, LeaseRefused))]
async fn flip_volume(
    State(reg): Reg,
    Path(id): Path<String>,
    body: Option<Json<FlipRequest>>,
) -> ApiResult<Response> {
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let vol = changed_here(&reg, &id).await?;
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
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct CancelQuery {
    /// Cancel only the flip armed for this migration.
    migration: Option<String>,
}

/// Cancels an armed flip.
#[utoipa::path(delete, path = "/v1/volumes/{id}/flip", tag = "leases", params(("id" = String, Path, description = "The volume's name"), CancelQuery),
    responses((status = 200, description = "The lease table", body = LeaseView), NoSuchVolume, LeaseRefused))]

async fn cancel_flip(
    State(reg): Reg,
    Path(id): Path<String>,
    Query(q): Query<CancelQuery>,
) -> ApiResult<Json<LeaseView>> {
    let vol = changed_here(&reg, &id).await?;
    flip::cancel_armed(&vol, q.migration.as_deref()).await?;
    Ok(Json(vol.lease_view()))
}

/// Undoes the flip that made `epoch`, if the volume has not moved on since.
#[utoipa::path(post, path = "/v1/volumes/{id}/rollback", tag = "leases", params(("id" = String, Path, description = "The volume's name")), request_body = RollbackRequest,
    responses((status = 200, description = "Rolled back", body = FlipReport), NoSuchVolume, LeaseRefused))]
async fn rollback(
    State(reg): Reg,
    Path(id): Path<String>,
    Json(req): Json<RollbackRequest>,
) -> ApiResult<Json<FlipReport>> {
    let vol = changed_here(&reg, &id).await?;
    Ok(Json(
        flip::rollback_flip(&reg, &vol, req.epoch, &req.primary).await?,
    ))
}

/// Flips several volumes from one host to another at once (all or none).
#[utoipa::path(post, path = "/v1/leases/flip", tag = "leases", request_body = GroupFlipRequest,
    responses((status = 200, description = "Flipped", body = GroupFlipReport),
        (status = 400, description = "No volumes, or one twice", body = ErrorBody), NoSuchVolume, LeaseRefused, SplitMasters))]
async fn flip_group(
    State(reg): Reg,
    Json(req): Json<GroupFlipRequest>,
) -> ApiResult<Json<GroupFlipReport>> {
    let names: Vec<&str> = req.volumes.iter().map(|v| v.volume.as_str()).collect();
    names_mastered_here(&reg, &names).await?;
    let report = flip::flip_group(&reg, &req).await?;
    vmhop_common::faults::point("flip.acknowledge");
    Ok(Json(report))
}

/// Revokes a host's leases on several volumes.
#[utoipa::path(post, path = "/v1/leases/revoke", tag = "leases", request_body = GroupRevokeRequest,
    responses((status = 200, description = "The lease tables", body = Vec<LeaseView>), NoSuchVolume, LeaseRefused, SplitMasters))]
async fn revoke_group(
    State(reg): Reg,
    Json(req): Json<GroupRevokeRequest>,
) -> ApiResult<Json<Vec<LeaseView>>> {
    let names: Vec<&str> = req.volumes.iter().map(String::as_str).collect();
    names_mastered_here(&reg, &names).await?;
    Ok(Json(flip::revoke_group(&reg, &req).await?))
}

/// Undoes a group flip on every volume that has not moved on since.
#[utoipa::path(post, path = "/v1/leases/rollback", tag = "leases", request_body = GroupRollbackRequest,
    responses((status = 200, description = "Rolled back", body = GroupFlipReport), NoSuchVolume, LeaseRefused, SplitMasters))]
async fn rollback_group(
    State(reg): Reg,
    Json(req): Json<GroupRollbackRequest>,
) -> ApiResult<Json<GroupFlipReport>> {
    let names: Vec<&str> = req.volumes.iter().map(|v| v.volume.as_str()).collect();
    names_mastered_here(&reg, &names).await?;
    Ok(Json(flip::rollback_group(&reg, &req).await?))
}

/// Revokes a host's lease on the volume (optionally only in a given state).
#[utoipa::path(post, path = "/v1/volumes/{id}/leases/revoke", tag = "leases", params(("id" = String, Path, description = "The volume's name")), request_body = RevokeRequest,
    responses((status = 200, description = "The lease table", body = LeaseView), NoSuchVolume, LeaseRefused))]
async fn revoke(
    State(reg): Reg,
    Path(id): Path<String>,
    Json(req): Json<RevokeRequest>,
) -> ApiResult<Json<LeaseView>> {
    let vol = changed_here(&reg, &id).await?;
    flip::revoke(&reg, &vol, &req.host, req.only_if).await?;
    Ok(Json(vol.lease_view()))
}

vmhop_common::error_answers! {
    ErrorBody;
    /// The answer to a request about a volume that does not exist ([`RegistryError::NotFound`]).
    NoSuchVolume = 404, "No such volume";
    /// The answer to a lease change that the volume's lease state does not allow.
    LeaseRefused = 409, "Refused: the lease state does not allow it";
    /// The answer to a change of several volumes mastered on different nodes
    /// ([`RegistryError::SplitMasters`]).
    SplitMasters = 421, "Cluster mode: the volumes are mastered on different nodes; `masters` names each one's, to send each its part";
}

/// The REST API's OpenAPI document, made from the handlers above; `storaged/openapi.yaml` is
/// this document, checked in (a unit test fails when they differ).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "storaged",
        description = "Volumes and their leases: create, inspect, flip, roll back, revoke."
    ),
    paths(
        health,
        metrics,
        list,
        create,
        show,
        delete,
        set_access,
        leases,
        flip_volume,
        cancel_flip,
        rollback,
        revoke,
        flip_group,
        revoke_group,
        rollback_group
    )
)]
pub struct ApiDoc;

vmhop_common::openapi_drift_test!(super::ApiDoc);
