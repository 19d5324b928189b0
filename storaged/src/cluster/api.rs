//! The REST routes of cluster mode, merged into the API's router when storaged runs with
//! `--etcd`: `POST /v1/cluster/volumes` creates a replicated volume, `GET
//! /v1/cluster/volumes/{name}` shows its placement, in-sync set and master.

use super::{placement, Cluster, ClusterError};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;
use storaged_client::api::ErrorBody;
use storaged_client::cluster::{Placement, ReplicatedVolumeRequest, ReplicatedVolumeView};

/// A failed cluster call, mapped to HTTP.
struct Failure(ClusterError);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            ClusterError::NotFound(_) => StatusCode::NOT_FOUND,
            ClusterError::Exists(_) | ClusterError::TooFewNodes { .. } => StatusCode::CONFLICT,
            ClusterError::Registry(crate::registry::RegistryError::Volume(_)) => {
                StatusCode::BAD_REQUEST
            }
            ClusterError::Etcd(_) | ClusterError::NoSession => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let error = vmhop_common::error::chain(&self.0);
        let body = ErrorBody {
            error,
            redirect: None,
            masters: None,
            electing: false,
        };
        (status, Json(body)).into_response()
    }
}

/// The cluster routes.
pub fn router(cluster: Arc<Cluster>) -> Router {
    Router::new()
        .route("/v1/cluster/volumes", post(create))
        .route("/v1/cluster/volumes/{id}", get(show))
        .with_state(cluster)
}

async fn create(
    State(cluster): State<Arc<Cluster>>,
    Json(req): Json<ReplicatedVolumeRequest>,
) -> Result<(StatusCode, Json<Placement>), Failure> {
    let p = placement::create(&cluster, req.config, req.replicas)
        .await
        .map_err(Failure)?;
    Ok((StatusCode::CREATED, Json(p)))
}

async fn show(
    State(cluster): State<Arc<Cluster>>,
    Path(id): Path<String>,
) -> Result<Json<ReplicatedVolumeView>, Failure> {
    placement::view(&cluster, &id)
        .await
        .map(Json)
        .map_err(Failure)
}
