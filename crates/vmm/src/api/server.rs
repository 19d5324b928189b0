//! The HTTP side: axum on a tokio Unix listener.

use super::{ApiError, ApiRequest, ApiResponse};
use crate::vm::VmEvent;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};
use std::future::Future;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::time::Duration;

/// How long a handler waits for the control loop (a pause waits for every vCPU).
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

type Events = Sender<VmEvent>;
type Reply = (StatusCode, Json<serde_json::Value>);

/// Binds the socket at `path` (replacing a stale one) and returns the server future. Must be
/// called inside the tokio runtime.
pub fn bind(
    path: &Path,
    events: Sender<VmEvent>,
) -> Result<impl Future<Output = ()> + Send + 'static, ApiError> {
    let err = |e| ApiError::Bind(path.display().to_string(), e);
    let _ = std::fs::remove_file(path);
    let std_listener = std::os::unix::net::UnixListener::bind(path).map_err(err)?;
    std_listener.set_nonblocking(true).map_err(err)?;
    let listener = tokio::net::UnixListener::from_std(std_listener).map_err(err)?;
    let app = Router::new()
        .route("/v1/vm", get(info))
        .route("/v1/vm/pause", put(pause))
        .route("/v1/vm/resume", put(resume))
        .route("/v1/vm/shutdown", put(shutdown))
        .with_state(events);
    Ok(async move {
        if let Err(e) = axum::serve(listener, app).await {
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
        Ok(Ok(ApiResponse::Info(info))) => (
            StatusCode::OK,
            Json(serde_json::to_value(info).unwrap_or_default()),
        ),
        Ok(Ok(ApiResponse::Error(e))) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
        Ok(Err(_)) => error(StatusCode::SERVICE_UNAVAILABLE, "the VM is shutting down"),
        Err(_) => error(StatusCode::GATEWAY_TIMEOUT, "the VM did not answer in time"),
    }
}

fn error(code: StatusCode, msg: &str) -> Reply {
    (code, Json(serde_json::json!({ "error": msg })))
}

async fn info(State(e): State<Events>) -> Reply {
    call(&e, ApiRequest::Info).await
}
async fn pause(State(e): State<Events>) -> Reply {
    call(&e, ApiRequest::Pause).await
}
async fn resume(State(e): State<Events>) -> Reply {
    call(&e, ApiRequest::Resume).await
}
async fn shutdown(State(e): State<Events>) -> Reply {
    call(&e, ApiRequest::Shutdown).await
}
