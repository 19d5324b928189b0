//! The REST API, served on TCP (for peers and remote `migratectl --host`) and on the Unix
//! socket (for local tools). HTTP/1.1, JSON bodies; errors are `{"error": "..."}` with 400
//! (bad input), 404 (unknown instance or migration), 409 (conflicts with the current state),
//! 502 (a VMM or peer failed) or 500; on TCP, 401 for a request without the cluster's token
//! when one is set ([`vmhop_common::token`]).
//!
//! | method | path                              | body               | answer                |
//! |--------|-----------------------------------|--------------------|-----------------------|
//! | GET    | /v1/host                          |                    | `HostInfo`            |
//! | GET    | /v1/hosts                         |                    | `[HostEntry]`         |
//! | GET    | /v1/instances                     |                    | `[InstanceRecord]`    |
//! | POST   | /v1/instances                     | `InstanceConfig`   | 201 `InstanceRecord`  |
//! | GET    | /v1/instances/{name}              |                    | `InstanceRecord`      |
//! | POST   | /v1/instances/{name}/stop         |                    | `InstanceRecord`      |
//! | POST   | /v1/instances/{name}/migrate      | `MigrateRequest`   | 202 `MigrationRecord` |
//! | GET    | /v1/migrations                    |                    | `[MigrationInfo]`     |
//! | GET    | /v1/migrations/{id}               |                    | `MigrationInfo`       |
//! | POST   | /v1/incoming                      | `IncomingRequest`  | `IncomingReady` (peer)|
//! | GET    | /v1/incoming/{id}                 |                    | `MigrationRecord`     |
//! | POST   | /v1/incoming/{id}/resume          |                    | `MigrationRecord`     |
//! | POST   | /v1/incoming/{id}/abort           |                    | `MigrationRecord`     |

use crate::agent::{Agent, AgentError};
use crate::config::InstanceConfig;
use crate::instance::InstanceRecord;
use crate::migration::{
    IncomingReady, IncomingRequest, MigrateRequest, MigrationInfo, MigrationRecord, Role,
};
use crate::peer::{HostInfo, Peer};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use vmhop_common::token;

/// A failed API call as the server maps it to HTTP.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The agent refused or failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The body was not the JSON expected.
    #[error("bad request body: {0}")]
    Body(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Body(_) => StatusCode::BAD_REQUEST,
            ApiError::Agent(a) => match a {
                AgentError::NotFound(_) => StatusCode::NOT_FOUND,
                AgentError::Conflict(_) => StatusCode::CONFLICT,
                AgentError::Invalid(_) | AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
                AgentError::Vmm(_) | AgentError::Peer(..) | AgentError::Instance(_) => {
                    StatusCode::BAD_GATEWAY
                }
                AgentError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        };
        let msg = vmhop_common::error::chain(&self);
        (status, Json(serde_json::json!({ "error": msg }))).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError::Body(r.body_text())
    }
}

/// One row of `GET /v1/hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEntry {
    /// Host id.
    pub host_id: String,
    /// REST address.
    pub addr: String,
    /// This host.
    pub local: bool,
    /// Answered just now.
    pub reachable: bool,
    /// What it said about itself.
    pub info: Option<HostInfo>,
    /// Why it did not answer.
    pub error: Option<String>,
}

type St = State<Arc<Agent>>;
type R<T> = Result<T, ApiError>;

/// The API's routes.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/host", get(host))
        .route("/v1/hosts", get(hosts))
        .route("/v1/instances", get(instances).post(run))
        .route("/v1/instances/{name}", get(instance))
        .route("/v1/instances/{name}/stop", post(stop))
        .route("/v1/instances/{name}/migrate", post(migrate))
        .route("/v1/migrations", get(migrations))
        .route("/v1/migrations/{id}", get(migration))
        .route("/v1/incoming", post(incoming_prepare))
        .route("/v1/incoming/{id}", get(incoming_show))
        .route("/v1/incoming/{id}/resume", post(incoming_resume))
        .route("/v1/incoming/{id}/abort", post(incoming_abort))
        .with_state(agent)
}

/// The routes as served on TCP: with a token, only requests that carry it pass
/// (see [`vmhop_common::token`]).
pub fn tcp_router(agent: Arc<Agent>) -> Router {
    match agent.cfg.token.clone() {
        Some(t) => router(agent).layer(axum::middleware::from_fn_with_state(t, token::require)),
        None => router(agent),
    }
}

/// This host's summary.
pub fn host_info(agent: &Agent) -> HostInfo {
    HostInfo {
        host_id: agent.cfg.host_id.clone(),
        listen: agent.cfg.listen.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        active_instances: agent
            .instances()
            .iter()
            .filter(|i| !i.state.is_terminal())
            .count(),
        active_migrations: agent
            .migrations()
            .iter()
            .filter(|m| !m.phase.is_terminal())
            .count(),
    }
}

async fn host(State(a): St) -> Json<HostInfo> {
    Json(host_info(&a))
}

async fn hosts(State(a): St) -> Json<Vec<HostEntry>> {
    let mut out = vec![HostEntry {
        host_id: a.cfg.host_id.clone(),
        addr: a.cfg.listen.to_string(),
        local: true,
        reachable: true,
        info: Some(host_info(&a)),
        error: None,
    }];
    let peers: Vec<(String, String)> = a.cfg.peers.clone().into_iter().collect();
    let token = a.cfg.token.clone();
    let probes = peers.into_iter().map(|(id, addr)| {
        let peer = Peer::new(&addr, token.as_ref());
        async move {
            let r = peer.with_timeout(Duration::from_secs(2)).host().await;
            HostEntry {
                host_id: id,
                addr,
                local: false,
                reachable: r.is_ok(),
                error: r.as_ref().err().map(|e| vmhop_common::error::chain(e)),
                info: r.ok(),
            }
        }
    });
    out.extend(futures_join(probes).await);
    Json(out)
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

async fn instances(State(a): St) -> Json<Vec<InstanceRecord>> {
    Json(a.instances())
}

async fn instance(State(a): St, Path(name): Path<String>) -> R<Json<InstanceRecord>> {
    Ok(Json(a.instance(&name)?))
}

async fn run(
    State(a): St,
    body: Result<Json<InstanceConfig>, JsonRejection>,
) -> R<(StatusCode, Json<InstanceRecord>)> {
    let Json(cfg) = body?;
    let rec = a.run(cfg).await?;
    Ok((StatusCode::CREATED, Json(rec)))
}

async fn stop(State(a): St, Path(name): Path<String>) -> R<Json<InstanceRecord>> {
    Ok(Json(a.stop(&name).await?))
}

async fn migrate(
    State(a): St,
    Path(name): Path<String>,
    body: Result<Json<MigrateRequest>, JsonRejection>,
) -> R<(StatusCode, Json<MigrationRecord>)> {
    let Json(req) = body?;
    let rec = crate::coordinator::start(&a, &name, req)?;
    Ok((StatusCode::ACCEPTED, Json(rec)))
}

fn info(a: &Agent, record: MigrationRecord) -> MigrationInfo {
    MigrationInfo {
        progress: a.progress(&record.id),
        record,
    }
}

async fn migrations(State(a): St) -> Json<Vec<MigrationInfo>> {
    let mut all: Vec<_> = a.migrations().into_iter().map(|m| info(&a, m)).collect();
    all.sort_by_key(|m| m.record.started_ms);
    Json(all)
}

async fn migration(State(a): St, Path(id): Path<String>) -> R<Json<MigrationInfo>> {
    Ok(Json(info(&a, a.migration(&id)?)))
}

async fn incoming_prepare(
    State(a): St,
    body: Result<Json<IncomingRequest>, JsonRejection>,
) -> R<Json<IncomingReady>> {
    let Json(req) = body?;
    Ok(Json(crate::incoming::prepare(&a, req).await?))
}

fn incoming_record(a: &Agent, id: &str) -> R<MigrationRecord> {
    let m = a.migration(id)?;
    if m.role != Role::Destination {
        return Err(AgentError::NotFound(format!("incoming migration {id}")).into());
    }
    Ok(m)
}

async fn incoming_show(State(a): St, Path(id): Path<String>) -> R<Json<MigrationRecord>> {
    Ok(Json(incoming_record(&a, &id)?))
}

async fn incoming_resume(State(a): St, Path(id): Path<String>) -> R<Json<MigrationRecord>> {
    incoming_record(&a, &id)?;
    Ok(Json(crate::incoming::resume(&a, &id).await?))
}

async fn incoming_abort(State(a): St, Path(id): Path<String>) -> R<Json<MigrationRecord>> {
    incoming_record(&a, &id)?;
    Ok(Json(
        crate::incoming::abort(&a, &id, "the source asked to abort").await?,
    ))
}
