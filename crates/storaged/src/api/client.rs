//! A small HTTP/1 client for the control API (used by the CLI and the tests).

use super::token::Token;
use super::ErrorBody;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;
use tokio::net::TcpStream;

/// A failed API call as the client sees it.
#[derive(Debug, Error)]
pub enum ApiClientError {
    /// Could not reach the server.
    #[error("connecting to {0}")]
    Connect(String, #[source] std::io::Error),
    /// HTTP-level failure.
    #[error("HTTP")]
    Http(#[from] hyper::Error),
    /// The server answered an error.
    #[error("{status}: {message}")]
    Status {
        /// HTTP status.
        status: StatusCode,
        /// The server's message.
        message: String,
    },
    /// The answer was not the expected JSON.
    #[error("decoding the answer")]
    Decode(#[from] serde_json::Error),
}

/// Client for one storaged API address (`host:port`).
#[derive(Debug, Clone)]
pub struct ApiClient {
    addr: String,
    token: Option<Token>,
}

impl ApiClient {
    /// A client for `addr`.
    pub fn new(addr: impl Into<String>) -> ApiClient {
        ApiClient {
            addr: addr.into(),
            token: None,
        }
    }

    /// The same client, sending `token` as `Authorization: Bearer` with every request.
    pub fn with_token(self, token: Option<Token>) -> ApiClient {
        ApiClient { token, ..self }
    }

    /// Sends one request; returns status and body bytes.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ApiClientError> {
        let stream = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| ApiClientError::Connect(self.addr.clone(), e))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.addr);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {}", t.secret()));
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("request parts are valid");
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        driver.abort();
        Ok((status, bytes))
    }

    /// Sends a request with an optional JSON body and decodes a JSON answer.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ApiClientError> {
        let body = body.map(serde_json::to_vec).transpose()?;
        let (status, bytes) = self.raw(method, path, body).await?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ApiClientError::Status { status, message });
        }
        if bytes.is_empty() {
            return Ok(serde_json::from_slice(b"null")?);
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}
