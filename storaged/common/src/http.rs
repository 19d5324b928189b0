//! The HTTP/1.1 + JSON client of the project's APIs: storaged's REST API and migrated's over
//! TCP (migrated's in mutual TLS with the host's certificate when it has one, see
//! [`HttpTls`]), a VMM's and the local migrated's over a Unix socket. One connection per
//! request, which may be opened ahead of it ([`Prepared`]); every request has a deadline; error answers (`{"error": "..."}`) become
//! [`HttpError::Status`]. A `307 Temporary Redirect` whose body names another server
//! (`{"error": "...", "redirect": "host:port"}`: storaged in cluster mode sends a lease change
//! to the volume's master) is followed, at most [`MAX_REDIRECTS`] times.

use crate::tls::{server_name, HostTls, TlsError};
use crate::token::Token;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};

/// A failed request.
#[derive(Debug, Error)]
pub enum HttpError {
    /// The server could not be reached.
    #[error("connecting to {0}")]
    Connect(String, #[source] std::io::Error),
    /// The TLS session could not be set up: the server is not the host expected, or refused
    /// this one's certificate.
    #[error("TLS with {0}, checking that it is {1:?}")]
    Tls(String, String, #[source] std::io::Error),
    /// The exchange failed at the HTTP level.
    #[error("HTTP exchange with {0}")]
    Http(String, #[source] hyper::Error),
    /// No answer within the deadline.
    #[error("{0} did not answer within {1:?}")]
    Timeout(String, Duration),
    /// The server answered with an error status: its message first, then who said it (the
    /// status is for programs: [`HttpError::status`]).
    #[error("{message} ({target})")]
    Status {
        /// Who answered.
        target: String,
        /// HTTP status.
        status: StatusCode,
        /// The `error` field of the body, or the body.
        message: String,
        /// The body, when it is JSON (for the fields an answer adds to `error`); boxed, as it
        /// is rare and would make every result carrying this error larger.
        details: Option<Box<serde_json::Value>>,
    },
    /// The answer was not the JSON expected.
    #[error("decoding the answer of {0}")]
    Decode(String, #[source] serde_json::Error),
    /// A request cut into parts, one per server, of which some were made and another failed:
    /// the outcome is neither done nor refused, and is to be read back.
    #[error("{done} of {parts} parts of the request were made, then")]
    Partial {
        /// Parts made.
        done: usize,
        /// Parts sent.
        parts: usize,
        /// The first part that failed.
        #[source]
        failed: Box<HttpError>,
    },
}

impl HttpError {
    /// The HTTP status, when the server answered one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            HttpError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The JSON body of an error answer, when it had one.
    pub fn details(&self) -> Option<&serde_json::Value> {
        match self {
            HttpError::Status { details, .. } => details.as_deref(),
            _ => None,
        }
    }

    /// True when the server could not be reached at all (nothing listening, no route, timeout
    /// while connecting).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            HttpError::Connect(..) | HttpError::Timeout(..) | HttpError::Tls(..)
        )
    }
}

/// Where requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `host:port` over TCP.
    Tcp(String),
    /// A Unix socket.
    Unix(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp(a) => write!(f, "{a}"),
            Target::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// TLS to a TCP target: this host's client certificate, and the host id (or IP address) the
/// server's certificate must prove.
#[derive(Clone)]
pub struct HttpTls {
    connector: tokio_rustls::TlsConnector,
    server: String,
}

impl std::fmt::Debug for HttpTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTls")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl HttpTls {
    /// TLS with `host`'s client certificate to a server that must prove `server`.
    pub fn new(host: &HostTls, server: impl Into<String>) -> Result<HttpTls, TlsError> {
        Ok(HttpTls {
            connector: tokio_rustls::TlsConnector::from(host.client_config()?),
            server: server.into(),
        })
    }

    /// The same TLS settings for a server that must prove `server`.
    pub fn with_server(&self, server: impl Into<String>) -> HttpTls {
        HttpTls {
            connector: self.connector.clone(),
            server: server.into(),
        }
    }

    /// The name the server must prove.
    pub fn server(&self) -> &str {
        &self.server
    }
}

/// How long a TCP connection may take to be accepted before the server counts as out of
/// reach ([`HttpError::Connect`]).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Redirects followed per call.
pub const MAX_REDIRECTS: usize = 3;

/// A JSON client for one target with one default deadline.
#[derive(Debug, Clone)]
pub struct Client {
    target: Target,
    timeout: Duration,
    bearer: Option<Token>,
    tls: Option<HttpTls>,
}

/// An open HTTP/1.1 connection that carries one request. [`Client::prepare`] opens one ahead
/// of a request whose latency matters (the lease flip and the resume while a guest is paused),
/// so that the request does not wait for the TCP connect and the TLS handshake.
pub struct Prepared {
    client: Client,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("target", &self.client.target)
            .finish_non_exhaustive()
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Prepared {
    async fn over<S>(client: &Client, io: S) -> Result<Prepared, HttpError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| HttpError::Http(client.target.to_string(), e))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Prepared {
            client: client.clone(),
            sender,
            driver,
        })
    }

    /// Sends the request and reads the whole answer. A connection that was closed before it
    /// took the request (the server ended it while it waited) gives the request back unsent.
    async fn exchange(mut self, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), Failed> {
        let name = self.client.target.to_string();
        let http = |e| HttpError::Http(name.clone(), e);
        let resp = match self.sender.try_send_request(req).await {
            Ok(resp) => resp,
            Err(mut e) => {
                return Err(match e.take_message() {
                    Some(req) => Failed::Unsent(Box::new(req), http(e.into_error())),
                    None => Failed::Error(http(e.into_error())),
                })
            }
        };
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Failed::Error(http(e)))?;
        Ok((status, body.to_bytes()))
    }

    /// [`Client::call`] on this connection (a redirect goes on with new ones).
    pub async fn call<T: DeserializeOwned>(
        self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, HttpError> {
        let client = self.client.clone();
        client.call_on(Some(self), method, path, body).await
    }
}

/// Why [`Prepared::exchange`] has no answer.
enum Failed {
    /// The connection closed before it took the request: it reached no server, and may go on
    /// another connection.
    Unsent(Box<Request<Full<Bytes>>>, HttpError),
    /// The request may have reached the server.
    Error(HttpError),
}

impl Failed {
    fn into_error(self) -> HttpError {
        match self {
            Failed::Unsent(_, e) | Failed::Error(e) => e,
        }
    }
}

/// The server a `307` answer sends the request to (`"redirect"` in its JSON body).
fn redirect_of(status: StatusCode, body: &[u8]) -> Option<String> {
    if status != StatusCode::TEMPORARY_REDIRECT {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let to = v.get("redirect")?.as_str()?;
    (!to.is_empty() && to.len() <= 256).then(|| to.to_string())
}

impl Client {
    /// A client for `target` whose requests fail after `timeout`.
    pub fn new(target: Target, timeout: Duration) -> Client {
        Client {
            target,
            timeout,
            bearer: None,
            tls: None,
        }
    }

    /// The same client, in TLS to a TCP target (`None`: plaintext).
    pub fn with_tls(self, tls: Option<HttpTls>) -> Client {
        Client { tls, ..self }
    }

    /// The same client, sending `token` as `Authorization: Bearer` with every request.
    pub fn with_token(self, token: Option<Token>) -> Client {
        Client {
            bearer: token,
            ..self
        }
    }

    /// The same client for the TCP server `to` (`host:port`); in TLS, checking that server's
    /// certificate against its address.
    pub fn redirected(&self, to: &str) -> Client {
        let host = to.rsplit_once(':').map_or(to, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Client {
            target: Target::Tcp(to.to_string()),
            tls: self.tls.as_ref().map(|t| t.with_server(host)),
            ..self.clone()
        }
    }

    /// The target.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The same client with another deadline.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            timeout,
            ..self.clone()
        }
    }

    /// Opens a connection for one request (the TLS handshake done), within the deadline.
    pub async fn prepare(&self) -> Result<Prepared, HttpError> {
        match tokio::time::timeout(self.timeout, self.open()).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout(self.target.to_string(), self.timeout)),
        }
    }

    async fn open(&self) -> Result<Prepared, HttpError> {
        let name = self.target.to_string();
        match &self.target {
            Target::Tcp(addr) => {
                // A server that does not take the connection soon is out of reach (cut off, or
                // gone without a reset): nothing was sent, so a caller may try another one.
                let limit = self.timeout.min(CONNECT_TIMEOUT);
                let s =
                    match tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr)).await {
                        Ok(s) => s.map_err(|e| HttpError::Connect(name.clone(), e))?,
                        Err(_) => {
                            let e = std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!("no connection within {limit:?}"),
                            );
                            return Err(HttpError::Connect(name, e));
                        }
                    };
                // The requests are small and each waits for its answer: no Nagle delay.
                let _ = s.set_nodelay(true);
                match &self.tls {
                    None => Prepared::over(self, s).await,
                    Some(tls) => {
                        let failed = |e| HttpError::Tls(name.clone(), tls.server.clone(), e);
                        let server = server_name(&tls.server).map_err(|e| {
                            failed(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
                        })?;
                        let s = tls.connector.connect(server, s).await.map_err(failed)?;
                        Prepared::over(self, s).await
                    }
                }
            }
            Target::Unix(path) => {
                let s = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| HttpError::Connect(name.clone(), e))?;
                Prepared::over(self, s).await
            }
        }
    }

    /// Sends one request; returns the status and the body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        self.raw_on(None, method, path, body).await
    }

    /// [`Self::raw`] on `conn` if given, else on a new connection.
    async fn raw_on(
        &self,
        conn: Option<Prepared>,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        let name = self.target.to_string();
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        if let Some(t) = &self.bearer {
            req = req.header("authorization", format!("Bearer {}", t.secret()));
        }
        let req = match req.body(Full::new(Bytes::from(body.unwrap_or_default()))) {
            Ok(r) => r,
            Err(e) => {
                return Err(HttpError::Connect(
                    name,
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
                ))
            }
        };
        let fut = async {
            // A connection opened ahead may have been closed by the server since: the request
            // then goes on a new one (it was not sent).
            let req = match conn {
                Some(c) => match c.exchange(req).await {
                    Err(Failed::Unsent(req, e)) => {
                        tracing::debug!(target = %name, error = %e,
                            "the connection opened ahead was closed; sending on a new one");
                        *req
                    }
                    done => return done.map_err(Failed::into_error),
                },
                None => req,
            };
            self.open()
                .await?
                .exchange(req)
                .await
                .map_err(Failed::into_error)
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout(name, self.timeout)),
        }
    }

    /// Sends a request with an optional JSON body and decodes a JSON answer (an empty body
    /// decodes as `null`).
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, HttpError> {
        self.call_on(None, method, path, body).await
    }

    /// [`Self::call`], its first request on `conn` if given.
    async fn call_on<T: DeserializeOwned>(
        &self,
        conn: Option<Prepared>,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, HttpError> {
        let name = self.target.to_string();
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| HttpError::Decode(name.clone(), e))?;
        let mut hop = self.clone();
        let mut name = name;
        let (mut status, mut bytes) = hop.raw_on(conn, method.clone(), path, body.clone()).await?;
        for _ in 0..MAX_REDIRECTS {
            let Some(to) = redirect_of(status, &bytes) else {
                break;
            };
            tracing::info!(from = %name, to = %to, path, "following a redirect");
            hop = hop.redirected(&to);
            name = hop.target.to_string();
            (status, bytes) = hop.raw(method.clone(), path, body.clone()).await?;
        }
        if !status.is_success() {
            let details = serde_json::from_slice::<serde_json::Value>(&bytes).ok();
            let message = details
                .as_ref()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
            // An answer without a body still says what went wrong, in words.
            let message = if message.is_empty() {
                status.canonical_reason().unwrap_or("error").to_lowercase()
            } else {
                message
            };
            return Err(HttpError::Status {
                target: name,
                status,
                message,
                details: details.map(Box::new),
            });
        }
        let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        serde_json::from_slice(bytes).map_err(|e| HttpError::Decode(name, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_307_naming_a_server_is_a_redirect() {
        let body = br#"{"error":"not master","redirect":"10.0.0.2:10810"}"#;
        assert_eq!(
            redirect_of(StatusCode::TEMPORARY_REDIRECT, body).as_deref(),
            Some("10.0.0.2:10810")
        );
        assert_eq!(redirect_of(StatusCode::CONFLICT, body), None);
        assert_eq!(
            redirect_of(StatusCode::TEMPORARY_REDIRECT, br#"{"error":"x"}"#),
            None
        );
        assert_eq!(
            redirect_of(StatusCode::TEMPORARY_REDIRECT, b"not json"),
            None
        );
    }

    /// Reads the tests' `POST /v1/x` with body `1` from `s` and answers `{"a":1}`.
    async fn answer_the_test_call(s: &mut tokio::net::UnixStream) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.ends_with(b"\r\n\r\n1") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the request never came");
            request.extend_from_slice(&buf[..n]);
        }
        assert!(request.starts_with(b"POST /v1/x HTTP/1.1\r\n"));
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{\"a\":1}")
            .await
            .unwrap();
    }

    /// A prepared connection is open (accepted by the server) before its request is sent,
    /// and carries that request.
    #[tokio::test]
    async fn a_prepared_connection_is_open_before_its_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let client = Client::new(Target::Unix(path), Duration::from_secs(30));
        let conn = client.prepare().await.unwrap();
        let (mut s, _) = listener.accept().await.unwrap();
        let call = tokio::spawn(async move {
            conn.call::<serde_json::Value>(Method::POST, "/v1/x", Some(&1))
                .await
        });
        answer_the_test_call(&mut s).await;
        assert_eq!(call.await.unwrap().unwrap(), serde_json::json!({"a": 1}));
    }

    /// A prepared connection that the server closed before the request (an idle connection
    /// ended) does not fail the call: the request goes on a new connection, once.
    #[tokio::test]
    async fn a_request_for_a_closed_prepared_connection_goes_on_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let client = Client::new(Target::Unix(path), Duration::from_secs(30));
        let conn = client.prepare().await.unwrap();
        let (s, _) = listener.accept().await.unwrap();
        drop(s);
        // The connection's driver sees the end of the stream.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !conn.sender.is_closed() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the close was never seen"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let call = tokio::spawn(async move {
            conn.call::<serde_json::Value>(Method::POST, "/v1/x", Some(&1))
                .await
        });
        let accepted = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await;
        let Ok(Ok((mut s, _))) = accepted else {
            panic!(
                "no new connection; the call ended {:?}",
                call.await.unwrap()
            );
        };
        answer_the_test_call(&mut s).await;
        assert_eq!(call.await.unwrap().unwrap(), serde_json::json!({"a": 1}));
    }
}
