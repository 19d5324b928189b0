//! The shared secret that guards a REST API on TCP: storaged's control API and migrated's API.
//!
//! The secret is read from a file (the same on every host of a cluster); clients send it as
//! `Authorization: Bearer <secret>`, and the API refuses any request without it (401).
//! migrated's Unix socket is guarded by its file permissions instead and takes no token.
//! Without a token file an API is open to whoever can reach it, which is only sensible on
//! loopback; the daemons say so in their logs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// Fewest characters a secret may have.
pub const MIN_TOKEN_LEN: usize = 16;

/// A token file that cannot be used.
#[derive(Debug, Error)]
pub enum TokenError {
    /// The file could not be read.
    #[error("reading the token file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The secret is too short (or empty).
    #[error(
        "the token file {0} holds {1} characters; use at least {MIN_TOKEN_LEN} \
         (e.g. `head -c 32 /dev/urandom | base64 > FILE`)"
    )]
    Short(PathBuf, usize),
    /// The secret is not one line of visible ASCII.
    #[error("the token file {0} must hold one line of visible ASCII characters")]
    Charset(PathBuf),
}

/// The secret (its `Debug` never shows it).
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Reads the secret from `path` (surrounding whitespace ignored). A file others may read
    /// is accepted with a warning.
    pub fn load(path: &Path) -> Result<Token, TokenError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| TokenError::Read(path.to_path_buf(), e))?;
        let secret = text.trim();
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Charset(path.to_path_buf()));
        }
        if secret.len() < MIN_TOKEN_LEN {
            return Err(TokenError::Short(path.to_path_buf(), secret.len()));
        }
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o007 != 0 {
                tracing::warn!(file = %path.display(),
                    "the token file is readable by every user: chmod 600 it");
            }
        }
        Ok(Token(secret.into()))
    }

    /// The secret, for the `Authorization` header of outgoing requests.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is the secret, in time independent of where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let want = self.0.as_bytes();
        want.len() == presented.len()
            && want
                .iter()
                .zip(presented)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// Middleware of the TCP API: passes requests that carry the token, answers 401 otherwise.
#[cfg(feature = "server")]
pub async fn require(
    axum::extract::State(token): axum::extract::State<Token>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match presented {
        Some(p) if token.matches(p) => next.run(req).await,
        _ => {
            let why = if presented.is_some() {
                "wrong bearer token"
            } else {
                "missing bearer token"
            };
            tracing::warn!(target: "api", method = %req.method(), path = %req.uri().path(),
                why, "request refused");
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                axum::Json(serde_json::json!({
                    "error": format!("{why}: this API needs the cluster's token")
                })),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str, mode: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, p)
    }

    #[test]
    fn a_token_file_is_read_and_checked() {
        let (_d, p) = file("  0123456789abcdef0123\n", 0o600);
        let t = Token::load(&p).unwrap();
        assert_eq!(t.secret(), "0123456789abcdef0123");
        assert!(t.matches(b"0123456789abcdef0123"));
        assert!(!t.matches(b"0123456789abcdef0124"));
        assert!(!t.matches(b"0123456789abcdef012"));
        assert_eq!(format!("{t:?}"), "Token(..)");

        let (_d, p) = file("short\n", 0o600);
        assert!(matches!(Token::load(&p), Err(TokenError::Short(_, 5))));
        let (_d, p) = file("", 0o600);
        assert!(matches!(Token::load(&p), Err(TokenError::Short(_, 0))));
        let (_d, p) = file("0123456789 abcdef0123", 0o600);
        assert!(matches!(Token::load(&p), Err(TokenError::Charset(_))));
        assert!(matches!(
            Token::load(Path::new("/nonexistent/token")),
            Err(TokenError::Read(..))
        ));
    }
}
