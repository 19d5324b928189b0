//! The HTTP side: axum on a tokio Unix listener.

use super::{ApiError, ApiRequest, ApiResponse, Counters};
use crate::migration::SharedStatus;
use crate::vm::{VmError, VmEvent};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use std::future::Future;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::time::Duration;
use vmm_api::migration::{MigrationStatus, MigrationWait, SendParams, MAX_WAIT_MS};
use vmm_api::vm::{SnapshotRequest, VmCounters, VmInfo};

/// How long a handler waits for the control loop (a pause waits for every vCPU; a snapshot
/// writes the guest's memory).
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

type Events = Sender<VmEvent>;
type Reply = (StatusCode, Json<serde_json::Value>);

/// Binds the socket at `path` (replacing a stale one) and returns the server future, which
/// ends once `stop` fires and the requests in progress have been answered. Must be called
/// inside the tokio runtime.
pub fn bind(
    path: &Path,
    events: Sender<VmEvent>,
    counters: Counters,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<impl Future<Output = ()> + Send + 'static, ApiError> {
    let err = |e| ApiError::Bind(path.display().to_string(), e);
    let _ = std::fs::remove_file(path);
    let std_listener = std::os::unix::net::UnixListener::bind(path).map_err(err)?;
    std_listener.set_nonblocking(true).map_err(err)?;
    let listener = tokio::net::UnixListener::from_std(std_listener).map_err(err)?;
    let status = counters.migration.clone();
    let read_counters = get(move || counters_of(counters.clone()));
    let read_migration = get(move |events: State<Events>, wait: Query<MigrationWait>| {
        migration(events, wait, status.clone())
    });
    // Actions are POST, as in storaged's and migrated's APIs; PUT stays accepted for the
    // clients written against earlier versions.
    let app = Router::new()
        .route("/v1/vm", get(info))
        .route("/v1/vm/counters", read_counters)
        .route("/v1/vm/pause", post(pause).put(pause))
        .route("/v1/vm/resume", post(resume).put(resume))
        .route("/v1/vm/shutdown", post(shutdown).put(shutdown))
        .route("/v1/vm/snapshot", post(snapshot).put(snapshot))
        .route("/v1/migration", read_migration)
        .route("/v1/migration/send", post(send).put(send))
        .route("/v1/migration/abort", post(abort).put(abort))
        .with_state(events);
    Ok(async move {
        let stopped = async move {
            let _ = stop.await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!(error = %e, "API server stopped");
        }
    })
}

async fn call(events: &Events, req: ApiRequest) -> Reply {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if events.send(VmEvent::Api(req, tx)).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the VM is shutting down");
    }
    match tokio::time::timeout(REPLY_TIMEOUT, rx).await {
        Ok(Ok(ApiResponse::Info(info))) => reply(StatusCode::OK, &info),
        Ok(Ok(ApiResponse::Migration(m))) => reply(StatusCode::OK, &m),
        Ok(Ok(ApiResponse::Accepted(m))) => reply(StatusCode::ACCEPTED, &m),
        Ok(Ok(ApiResponse::Failed(e))) => failure(&e),
        Ok(Err(_)) => error(StatusCode::SERVICE_UNAVAILABLE, "the VM is shutting down"),
        Err(_) => error(StatusCode::GATEWAY_TIMEOUT, "the VM did not answer in time"),
    }
}

/// A failed request: 409 for a refusal in the VM's current state, 500 for the rest, with the
/// error and its causes on one line.
fn failure(e: &VmError) -> Reply {
    let code = if e.is_refusal() {
        StatusCode::CONFLICT
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    error(code, &vmhop_common::error::chain(e))
}

fn error(code: StatusCode, msg: &str) -> Reply {
    let body = ErrorBody {
        error: msg.to_string(),
    };
    reply(code, &body)
}

/// An answer with `body` as its JSON.
fn reply(code: StatusCode, body: &impl serde::Serialize) -> Reply {
    (code, Json(serde_json::to_value(body).unwrap_or_default()))
}

/// The VMM's counters: exits by reason, each disk's requests, the dirty rate while migrating
/// (read without the control loop, so it answers during a stop-and-copy too).
#[utoipa::path(get, path = "/v1/vm/counters", tag = "vm",
    responses((status = 200, description = "The counters", body = VmCounters)))]
async fn counters_of(c: Counters) -> Json<VmCounters> {
    Json(c.read())
}

/// The VM: its name, run state, shape and disks.
#[utoipa::path(get, path = "/v1/vm", tag = "vm",
    responses((status = 200, description = "The VM", body = VmInfo), Unanswered))]
async fn info(State(e): State<Events>) -> Reply {
    call(&e, ApiRequest::Info).await
}
/// Pauses every vCPU.
#[utoipa::path(post, path = "/v1/vm/pause", tag = "vm",
    responses((status = 200, description = "Paused", body = VmInfo), Refused, Failed, Unanswered))]
async fn pause(State(e): State<Events>) -> Reply {
    call(&e, ApiRequest::Pause).await
}
/// Runs the vCPUs again; on a destination that received the guest with `resume: wait`, runs
/// the guest for the first time.
#[utoipa::path(post, path = "/v1/vm/resume", tag = "vm",
    responses((status = 200, description = "Running", body = VmInfo), Refused, Failed, Unanswered))]
async fn resume(State(e): State<Events>) -> Reply {
    call(&e, ApiRequest::Resume).await
}
/// Ends the VMM: the disks are flushed and the process exits.
#[utoipa::path(post, path = "/v1/vm/shutdown", tag = "vm",
    responses((status = 200, description = "Shutting down", body = VmInfo), Refused, Failed, Unanswered))]
async fn shutdown(State(e): State<Events>) -> Reply {
    call(&e, ApiRequest::Shutdown).await
}
/// The migration's progress, then its final figures. With `phase`, a long poll: the answer
/// comes once the phase is another one (at once if it is already), or after `wait_ms`.
#[utoipa::path(get, path = "/v1/migration", tag = "migration", params(MigrationWait),
    responses((status = 200, description = "The migration", body = MigrationStatus), Unanswered))]
async fn migration(
    State(e): State<Events>,
    Query(wait): Query<MigrationWait>,
    status: SharedStatus,
) -> Reply {
    let Some(known) = wait.phase else {
        return call(&e, ApiRequest::MigrationStatus).await;
    };
    // Read from the shared status, not through the control loop: the loop saves the guest
    // during a stop-and-copy, and the hand-over that follows is what the caller waits for.
    let mut changes = status.subscribe();
    let limit = Duration::from_millis(wait.wait_ms.min(MAX_WAIT_MS));
    let _ = tokio::time::timeout(limit, changes.wait_for(|s| s.phase != known)).await;
    let now = changes.borrow().clone();
    reply(StatusCode::OK, &now)
}
/// Aborts the migration: a source keeps (or gets back) the guest; a source undecided after
/// COMMIT resumes only through this call, once the destination was fenced off.
#[utoipa::path(post, path = "/v1/migration/abort", tag = "migration",
    responses((status = 200, description = "Aborted", body = MigrationStatus), Refused, Failed, Unanswered))]
async fn abort(State(e): State<Events>) -> Reply {
    call(&e, ApiRequest::MigrationAbort).await
}

/// Parses a JSON body, answering 400 with the parser's message when it does not fit.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Reply> {
    serde_json::from_slice(bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("request body: {e}")))
}

/// Starts a live migration of the guest to a destination VMM started with `--incoming`.
#[utoipa::path(post, path = "/v1/migration/send", tag = "migration", request_body = SendParams,
    responses((status = 202, description = "Started", body = MigrationStatus),
        (status = 400, description = "Invalid parameters", body = ErrorBody), Refused, Unanswered))]
async fn send(State(e): State<Events>, bytes: axum::body::Bytes) -> Reply {
    match body::<vmm_api::migration::SendParams>(&bytes) {
        Ok(p) => match p.validate() {
            Ok(()) => call(&e, ApiRequest::MigrationSend(p)).await,
            Err(m) => error(StatusCode::BAD_REQUEST, &m.to_string()),
        },
        Err(r) => r,
    }
}
/// Writes a snapshot of the paused VM (memory, vCPU and device state) to a file.
#[utoipa::path(post, path = "/v1/vm/snapshot", tag = "vm", request_body = SnapshotRequest,
    responses((status = 200, description = "Written", body = VmInfo),
        (status = 400, description = "Invalid request", body = ErrorBody), Refused, Failed, Unanswered))]
async fn snapshot(State(e): State<Events>, bytes: axum::body::Bytes) -> Reply {
    match body::<vmm_api::vm::SnapshotRequest>(&bytes) {
        Ok(r) => call(&e, ApiRequest::Snapshot(r.path)).await,
        Err(r) => r,
    }
}

/// An error answer: the error and its causes on one line.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

vmhop_common::error_answers! {
    ErrorBody;
    /// The answer to a request the VM's current state does not allow.
    Refused = 409, "Refused in the VM's current state";
    /// The answer to a request the VM failed to carry out.
    Failed = 500, "Failed";
}

/// The answers of a request that the control loop did not answer.
#[derive(utoipa::IntoResponses)]
pub enum Unanswered {
    /// The loop has ended.
    #[response(status = 503, description = "The VM is shutting down")]
    ShuttingDown(ErrorBody),
    /// The loop did not answer within [`REPLY_TIMEOUT`].
    #[response(status = 504, description = "The VM did not answer in time")]
    TimedOut(ErrorBody),
}

/// The API's OpenAPI document, made from the handlers above; `vmm/openapi.yaml` is this
/// document, checked in (a unit test fails when they differ).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "vmm", description = include_str!("openapi.md")),
    paths(info, counters_of, pause, resume, shutdown, snapshot, migration, send, abort)
)]
pub struct ApiDoc;

vmhop_common::openapi_drift_test!(super::ApiDoc);

#[cfg(test)]
mod tests {
    use super::*;

    use crate::vcpu::{VcpuError, VcpuState};
    use crate::vm::Role;

    #[test]
    fn refusals_answer_409_and_failures_500_with_their_causes() {
        let (code, body) = failure(&VmError::HandedOver);
        assert_eq!(code, StatusCode::CONFLICT);
        assert!(body.0["error"].as_str().unwrap().contains("handed over"));
        assert_eq!(
            failure(&VmError::NothingToAbort(Role::Own)).0,
            StatusCode::CONFLICT
        );
        let timeout = VcpuError::Timeout(1, VcpuState::Paused, Duration::from_secs(5));
        let (code, body) = failure(&VmError::Pause(timeout));
        assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            body.0["error"],
            "pause the vCPUs: vCPU 1 did not reach Paused within 5s"
        );
    }

    /// The long poll: a known phase other than the current one answers at once; the current
    /// one waits for the change; the wait's end answers the status as it is.
    #[tokio::test]
    async fn the_long_poll_answers_when_the_phase_changes() {
        use vmm_api::migration::Phase;
        let (events, _loop) = std::sync::mpsc::channel();
        let status = SharedStatus::default();
        crate::migration::update(&status, |s| s.phase = Phase::Precopy);
        let ask = |phase: Phase, wait_ms: u64| {
            let wait = MigrationWait {
                phase: Some(phase),
                wait_ms,
            };
            super::migration(State(events.clone()), Query(wait), status.clone())
        };
        let (code, body) = ask(Phase::Idle, MAX_WAIT_MS).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body.0["phase"], "precopy");

        let waiting = tokio::spawn(ask(Phase::Precopy, MAX_WAIT_MS));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished());
        crate::migration::update(&status, |s| s.bytes_sent = 1);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "progress is not a change of phase");
        crate::migration::update(&status, |s| s.phase = Phase::HandedOver);
        let (_, body) = waiting.await.unwrap();
        assert_eq!(body.0["phase"], "handed-over");

        let (code, body) = ask(Phase::HandedOver, 0).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body.0["phase"], "handed-over");
    }
}
