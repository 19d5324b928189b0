//! The REST API's server: the routes of [`crate::api`] on axum, served on TCP (behind the
//! cluster's token when one is set, in mutual TLS when the host has a certificate) and on the
//! Unix socket. Every handler hands its request to the agent or to one side of a migration; an
//! error is answered with the status of its [`ErrorKind`].
//!
//! In TLS every caller is a host of the cluster, and the calls that act for one side of a
//! migration are taken only from that side: an incoming migration is prepared only for the
//! host that calls (the `source` it names must be the caller), and only its source host may
//! resume or abort it. Calls on the Unix socket come from this host's operator.

use crate::agent::{Agent, AgentError};
use crate::api::{
    route, ErrorAnswer, ErrorKind, HostEntry, HostInfo, IncomingReady, IncomingRequest,
    MigrateRequest, MigrationInfo, StopAnswer, StoragedReach,
};
use crate::config::InstanceConfig;
use crate::instance::InstanceRecord;
use crate::migration::destination::{self, DestinationError};
use crate::migration::record::MigrationRecord;
use crate::migration::source::{self, SourceError};
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use vmhop_common::tls_listener::Peer;
use vmhop_common::token;

/// A request the server could not serve.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The agent refused or failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The migration could not start.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// This host cannot be, or go on as, the destination.
    #[error(transparent)]
    Destination(#[from] DestinationError),
    /// The body was not the JSON expected.
    #[error("bad request body: {0}")]
    Body(String),
    /// The calling host may not act for this migration.
    #[error("host {caller:?} may not {what}: only its source host {source_host:?} may")]
    NotTheSource {
        /// Who called (its certificate's host id).
        caller: String,
        /// What it asked for.
        what: &'static str,
        /// The migration's source host.
        source_host: String,
    },
}

impl ApiError {
    /// What kind of failure this is: the answer's status.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ApiError::Agent(e) => e.kind(),
            ApiError::Source(e) => e.kind(),
            ApiError::Destination(e) => e.kind(),
            ApiError::Body(_) => ErrorKind::BadRequest,
            ApiError::NotTheSource { .. } => ErrorKind::Forbidden,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let answer = ErrorAnswer {
            error: vmhop_common::error::chain(&self),
        };
        (self.kind().status(), Json(answer)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError::Body(r.body_text())
    }
}

type St = State<Arc<Agent>>;
type R<T> = Result<T, ApiError>;
/// The host that called, when the request came in TLS.
type Caller = Option<Extension<ConnectInfo<Peer>>>;

/// Refuses a call in TLS from another host than `source`.
fn only_from(caller: &Caller, source: &str, what: &'static str) -> R<()> {
    match caller {
        Some(Extension(ConnectInfo(peer))) if peer.host != source => {
            tracing::warn!(caller = %peer.host, addr = %peer.addr, source, what,
                "refused: not the migration's source host");
            Err(ApiError::NotTheSource {
                caller: peer.host.clone(),
                what,
                source_host: source.to_string(),
            })
        }
        _ => Ok(()),
    }
}

/// Refuses `what` on the incoming migration `id` unless the caller is its source host.
fn from_its_source(a: &Agent, caller: &Caller, id: &str, what: &'static str) -> R<()> {
    let mig = destination::incoming(a, id)?;
    only_from(caller, &mig.source, what)
}

/// The API's routes.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route(route::HOST, get(host))
        .route(route::HOSTS, get(hosts))
        .route(route::INSTANCES, get(instances).post(run))
        .route(route::INSTANCE, get(instance).delete(remove))
        .route(route::INSTANCE_STOP, post(stop))
        .route(route::INSTANCE_MIGRATE, post(migrate))
        .route(route::MIGRATIONS, get(migrations))
        .route(route::MIGRATION, get(migration))
        .route(route::MIGRATION_ABORT, post(abort_migration))
        .route(route::METRICS, get(metrics))
        .route(route::INCOMING, post(incoming_prepare))
        .route(route::INCOMING_ONE, get(incoming_show))
        .route(route::INCOMING_RESUME, post(incoming_resume))
        .route(route::INCOMING_COMPLETE, post(incoming_complete))
        .route(route::INCOMING_ABORT, post(incoming_abort))
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

/// This host: its id, addresses and what it runs.
#[utoipa::path(get, path = "/v1/host", tag = "hosts", responses((status = 200, description = "This host", body = HostInfo)))]
async fn host(State(a): St) -> Json<HostInfo> {
    Json(a.host_info())
}

/// How long `GET /v1/hosts` waits for each peer and for storaged.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// This host (with whether it reaches storaged) and its peers, each probed.
#[utoipa::path(get, path = "/v1/hosts", tag = "hosts", responses((status = 200, description = "The hosts", body = Vec<HostEntry>)))]
async fn hosts(State(a): St) -> Json<Vec<HostEntry>> {
    let storaged = a.storaged().with_timeout(PROBE_TIMEOUT);
    let probe = tokio::spawn(async move { storaged.health().await });
    let mut out = vec![HostEntry {
        host_id: a.cfg.host_id.clone(),
        addr: a.cfg.listen.to_string(),
        local: true,
        reachable: true,
        info: Some(a.host_info()),
        error: None,
        storaged: None,
    }];
    let peers: Vec<(String, String)> = a.cfg.peers.clone().into_iter().collect();
    let probes = peers.into_iter().map(|(id, addr)| {
        let peer = a.peer(&id, &addr);
        async move {
            let r = peer.with_timeout(PROBE_TIMEOUT).host().await;
            HostEntry {
                host_id: id,
                addr,
                local: false,
                reachable: r.is_ok(),
                error: r.as_ref().err().map(|e| vmhop_common::error::chain(e)),
                info: r.ok(),
                storaged: None,
            }
        }
    });
    out.extend(futures_join(probes).await);
    let answered = match probe.await {
        Ok(r) => r.map_err(|e| vmhop_common::error::chain(&e)),
        Err(e) => Err(e.to_string()),
    };
    out[0].storaged = Some(StoragedReach {
        addr: a.cfg.storaged_api.clone(),
        reachable: answered.is_ok(),
        error: answered.err(),
    });
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

/// The guests this host runs or ran.
#[utoipa::path(get, path = "/v1/instances", tag = "instances", responses((status = 200, description = "The instances", body = Vec<InstanceRecord>)))]
async fn instances(State(a): St) -> Json<Vec<InstanceRecord>> {
    Json(a.instances())
}

/// One guest.
#[utoipa::path(get, path = "/v1/instances/{name}", tag = "instances", params(("name" = String, Path, description = "The instance's name")),
    responses((status = 200, description = "The instance", body = InstanceRecord), NotFound))]
async fn instance(State(a): St, Path(name): Path<String>) -> R<Json<InstanceRecord>> {
    // A record of a guest that migrated away is shown; a forgotten one says where it went.
    match a.instance(&name) {
        Err(AgentError::NoInstance(_)) => Ok(Json(a.instance_here(&name)?)),
        found => Ok(Json(found?)),
    }
}

/// Forgets a guest that no longer runs (stopped, lost or gone to another host).
#[utoipa::path(delete, path = "/v1/instances/{name}", tag = "instances", params(("name" = String, Path, description = "The instance's name")),
    responses((status = 200, description = "Forgotten", body = InstanceRecord), NotFound, Refused))]
async fn remove(State(a): St, Path(name): Path<String>) -> R<Json<InstanceRecord>> {
    Ok(Json(a.remove_instance(&name).await?))
}

/// Starts a guest on this host.
#[utoipa::path(post, path = "/v1/instances", tag = "instances", request_body = InstanceConfig,
    responses((status = 201, description = "Started", body = InstanceRecord), InvalidRequest, Refused))]
async fn run(
    State(a): St,
    body: Result<Json<InstanceConfig>, JsonRejection>,
) -> R<(StatusCode, Json<InstanceRecord>)> {
    let Json(cfg) = body?;
    let rec = a.run(cfg).await?;
    Ok((StatusCode::CREATED, Json(rec)))
}

/// Stops a guest and releases this host's leases on its storaged volumes.
#[utoipa::path(post, path = "/v1/instances/{name}/stop", tag = "instances", params(("name" = String, Path, description = "The instance's name")),
    responses((status = 200, description = "Stopped; what became of each lease", body = StopAnswer), NotFound, (status = 409, description = "Refused in the current state, or the guest migrated to another host", body = ErrorAnswer)))]
async fn stop(State(a): St, Path(name): Path<String>) -> R<Json<StopAnswer>> {
    Ok(Json(a.stop(&name).await?))
}

/// Starts a live migration of a guest to another host.
#[utoipa::path(post, path = "/v1/instances/{name}/migrate", tag = "migrations", params(("name" = String, Path, description = "The instance's name")), request_body = MigrateRequest,
    responses((status = 202, description = "Started", body = MigrationRecord), InvalidRequest, NotFound, Refused))]
async fn migrate(
    State(a): St,
    Path(name): Path<String>,
    body: Result<Json<MigrateRequest>, JsonRejection>,
) -> R<(StatusCode, Json<MigrationRecord>)> {
    let Json(req) = body?;
    let rec = source::start(&a, &name, req).await?;
    Ok((StatusCode::ACCEPTED, Json(rec)))
}

fn info(a: &Agent, record: MigrationRecord) -> MigrationInfo {
    MigrationInfo {
        progress: a.progress(&record.id),
        record,
    }
}

/// Every migration this host knows, oldest first.
#[utoipa::path(get, path = "/v1/migrations", tag = "migrations", responses((status = 200, description = "The migrations", body = Vec<MigrationInfo>)))]
async fn migrations(State(a): St) -> Json<Vec<MigrationInfo>> {
    let mut all: Vec<_> = a.migrations().into_iter().map(|m| info(&a, m)).collect();
    all.sort_by_key(|m| m.record.started_ms);
    Json(all)
}

/// One migration with its progress.
#[utoipa::path(get, path = "/v1/migrations/{id}", tag = "migrations", params(("id" = String, Path, description = "The migration's id")),
    responses((status = 200, description = "The migration", body = MigrationInfo), NotFound))]
async fn migration(State(a): St, Path(id): Path<String>) -> R<Json<MigrationInfo>> {
    Ok(Json(info(&a, a.migration(&id)?)))
}

/// Aborts a migration this host is the source of (until the guest was handed over); answers
/// once the abort is under way.
#[utoipa::path(post, path = "/v1/migrations/{id}/abort", tag = "migrations", params(("id" = String, Path, description = "The migration's id")),
    responses((status = 202, description = "Aborting", body = MigrationRecord), NotFound, Refused))]
async fn abort_migration(
    State(a): St,
    Path(id): Path<String>,
) -> R<(StatusCode, Json<MigrationRecord>)> {
    Ok((StatusCode::ACCEPTED, Json(source::request_abort(&a, &id)?)))
}

/// How long `GET /metrics` waits for each VMM's counters.
const VMM_COUNTERS_TIMEOUT: Duration = Duration::from_secs(1);

/// `GET /metrics`: the migrations' metrics and, per instance with a VMM, the VMM's counters
/// (see [`crate::metrics`]).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "metrics",
    responses(vmhop_common::openapi::PrometheusText)
)]
async fn metrics(State(a): St) -> impl IntoResponse {
    let instances = a.instances();
    let states: Vec<&'static str> = instances.iter().map(|i| i.state.as_str()).collect();
    let probes = instances
        .into_iter()
        .filter(|i| !i.state.is_terminal() && i.pid.is_some())
        .map(|i| {
            let vmm = a.vmm(&i).with_timeout(VMM_COUNTERS_TIMEOUT);
            async move { (i.name, vmm.counters().await.ok()) }
        });
    let vmms = futures_join(probes).await;
    let active = a
        .migrations()
        .iter()
        .filter(|m| !m.phase.is_terminal())
        .count();
    let body = a.metrics.encode(active, &states, &vmms);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        body,
    )
}

/// Prepares this host as a migration's destination (called by the source host).
#[utoipa::path(post, path = "/v1/incoming", tag = "peers", request_body = IncomingRequest,
    responses((status = 200, description = "Ready to receive", body = IncomingReady), InvalidRequest, NotItsSource, Refused))]
async fn incoming_prepare(
    State(a): St,
    caller: Caller,
    body: Result<Json<IncomingRequest>, JsonRejection>,
) -> R<Json<IncomingReady>> {
    let Json(req) = body?;
    only_from(&caller, &req.source, "prepare a migration from it")?;
    Ok(Json(destination::prepare(&a, req).await?))
}

/// The longest wait of `GET /v1/incoming/{id}?wait_ms=`.
pub const MAX_ENDED_WAIT: Duration = Duration::from_secs(60);

/// `GET /v1/incoming/{id}`'s query.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EndedQuery {
    /// Answer once the migration ended here (completed or aborted), or after this many
    /// milliseconds (at most 60000); without it, at once.
    pub wait_ms: Option<u64>,
}

/// An incoming migration as this destination sees it; with `wait_ms`, once it ended (the
/// source waits so for the outcome of the hand-over).
#[utoipa::path(get, path = "/v1/incoming/{id}", tag = "peers", params(("id" = String, Path, description = "The migration's id"), EndedQuery),
    responses((status = 200, description = "The migration", body = MigrationRecord), NotFound))]
async fn incoming_show(
    State(a): St,
    Path(id): Path<String>,
    Query(q): Query<EndedQuery>,
) -> R<Json<MigrationRecord>> {
    let mig = destination::incoming(&a, &id)?;
    match q.wait_ms {
        Some(ms) if ms > 0 && !mig.phase.is_terminal() => {
            let wait = Duration::from_millis(ms).min(MAX_ENDED_WAIT);
            Ok(Json(a.ended(&id, wait).await?))
        }
        _ => Ok(Json(mig)),
    }
}

/// Runs the received guest here, once the leases were flipped (called by the source host).
#[utoipa::path(post, path = "/v1/incoming/{id}/resume", tag = "peers", params(("id" = String, Path, description = "The migration's id")),
    responses((status = 200, description = "Running here", body = MigrationRecord), NotItsSource, NotFound, Refused))]
async fn incoming_resume(
    State(a): St,
    caller: Caller,
    Path(id): Path<String>,
) -> R<Json<MigrationRecord>> {
    from_its_source(&a, &caller, &id, "resume this migration")?;
    Ok(Json(destination::resume(&a, &id).await?))
}

/// The source handed the guest over: flips every volume here (conditional on the source still
/// holding each at its recorded epoch) and runs the guest, or answers why not (called by the
/// source host; this host does the same on its own as soon as its VMM holds the whole state).
#[utoipa::path(post, path = "/v1/incoming/{id}/complete", tag = "peers", params(("id" = String, Path, description = "The migration's id")),
    responses((status = 200, description = "Running here", body = MigrationRecord), NotItsSource, NotFound, Refused))]
async fn incoming_complete(
    State(a): St,
    caller: Caller,
    Path(id): Path<String>,
) -> R<Json<MigrationRecord>> {
    from_its_source(&a, &caller, &id, "complete this migration")?;
    Ok(Json(destination::complete(&a, &id).await?))
}

/// Abandons an incoming migration (called by the source host).
#[utoipa::path(post, path = "/v1/incoming/{id}/abort", tag = "peers", params(("id" = String, Path, description = "The migration's id")),
    responses((status = 200, description = "Abandoned", body = MigrationRecord), NotItsSource, NotFound, Refused))]
async fn incoming_abort(
    State(a): St,
    caller: Caller,
    Path(id): Path<String>,
) -> R<Json<MigrationRecord>> {
    from_its_source(&a, &caller, &id, "abort this migration")?;
    let why = DestinationError::AbortRequested;
    Ok(Json(destination::abort(&a, &id, &why).await?))
}

vmhop_common::error_answers! {
    ErrorAnswer;
    /// The answer to a request about an instance or a migration this host does not know
    /// ([`ErrorKind::NotFound`]).
    NotFound = 404, "Not found";
    /// The answer to a request that the instance's or the migration's state does not allow
    /// ([`ErrorKind::Conflict`]).
    Refused = 409, "Refused in the current state";
    /// The answer to a request whose body does not parse or does not hold
    /// ([`ErrorKind::BadRequest`]).
    InvalidRequest = 400, "Invalid request";
    /// The answer to a peer call from a host that is not the migration's source
    /// ([`ErrorKind::Forbidden`]).
    NotItsSource = 403, "Only the migration's source host may do this";
}

/// The REST API's OpenAPI document, made from the handlers above; `migrated/openapi.yaml` is
/// this document, checked in (a unit test fails when they differ).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "migrated",
        description = "Guests on this host and their live migrations; the `/v1/incoming` calls are the peer protocol between hosts."
    ),
    paths(
        host,
        hosts,
        remove,
        abort_migration,
        metrics,
        instances,
        instance,
        run,
        stop,
        migrate,
        migrations,
        migration,
        incoming_prepare,
        incoming_show,
        incoming_resume,
        incoming_complete,
        incoming_abort
    )
)]
pub struct ApiDoc;

vmhop_common::openapi_drift_test!(super::ApiDoc);
