//! `storaged serve` settings: a TOML file, overridden by command-line flags.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use thiserror::Error;
use vmhop_common::config::{load_toml, FileError};

/// A configuration that could not be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read or parsed.
    #[error(transparent)]
    File(#[from] FileError),
    /// A required setting is missing.
    #[error("missing setting {0} (flag or config file)")]
    Missing(&'static str),
}

/// The `[serve]` settings as written in the TOML file; every field optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfigFile {
    /// Data directory (volumes and metadata).
    pub data_dir: Option<PathBuf>,
    /// NBD listen address.
    pub nbd_listen: Option<SocketAddr>,
    /// REST API listen address.
    pub api_listen: Option<SocketAddr>,
    /// File to write the bound addresses to once listening.
    pub ready_file: Option<PathBuf>,
    /// Seconds open connections get to finish after SIGTERM.
    pub shutdown_grace_secs: Option<u64>,
    /// Seconds a flip waits for the old primary's admitted requests.
    pub drain_limit_secs: Option<u64>,
    /// Buffered writes up to this many bytes run on the connection task (0: never).
    pub inline_write_max: Option<u32>,
    /// File with the token the REST API requires ([`vmhop_common::token`]).
    pub api_token_file: Option<PathBuf>,
    /// This host's TLS directory ([`vmhop_common::tls`]): NBD clients then upgrade with
    /// `NBD_OPT_STARTTLS` and prove their host id with a certificate of the cluster's CA.
    pub tls_dir: Option<PathBuf>,
    /// With `tls_dir`: whether clients on loopback may still use plaintext (default true;
    /// their lease option is then taken at its word).
    pub plaintext_loopback: Option<bool>,
}

/// Effective settings of `storaged serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// NBD listen address.
    pub nbd_listen: SocketAddr,
    /// REST API listen address.
    pub api_listen: SocketAddr,
    /// Where to record the bound addresses.
    pub ready_file: Option<PathBuf>,
    /// Seconds open connections get after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Seconds a flip waits for draining.
    pub drain_limit_secs: u64,
    /// Buffered writes up to this many bytes run on the connection task.
    pub inline_write_max: u32,
    /// File with the token the REST API requires.
    pub api_token_file: Option<PathBuf>,
    /// This host's TLS directory.
    pub tls_dir: Option<PathBuf>,
    /// Whether loopback clients may skip TLS.
    pub plaintext_loopback: bool,
}

impl ServeConfigFile {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<ServeConfigFile, ConfigError> {
        Ok(load_toml(path)?)
    }

    /// Applies `over` (flags) on top of `self` (file) and fills defaults.
    pub fn merge(self, over: ServeConfigFile) -> Result<ServeConfig, ConfigError> {
        Ok(ServeConfig {
            data_dir: over
                .data_dir
                .or(self.data_dir)
                .ok_or(ConfigError::Missing("data_dir"))?,
            nbd_listen: over
                .nbd_listen
                .or(self.nbd_listen)
                .unwrap_or_else(|| "127.0.0.1:10809".parse().expect("literal")),
            api_listen: over
                .api_listen
                .or(self.api_listen)
                .unwrap_or_else(|| "127.0.0.1:10810".parse().expect("literal")),
            ready_file: over.ready_file.or(self.ready_file),
            shutdown_grace_secs: over
                .shutdown_grace_secs
                .or(self.shutdown_grace_secs)
                .unwrap_or(30),
            drain_limit_secs: over
                .drain_limit_secs
                .or(self.drain_limit_secs)
                .unwrap_or(30),
            inline_write_max: over
                .inline_write_max
                .or(self.inline_write_max)
                .unwrap_or(64 << 10),
            api_token_file: over.api_token_file.or(self.api_token_file),
            tls_dir: over.tls_dir.or(self.tls_dir),
            plaintext_loopback: over
                .plaintext_loopback
                .or(self.plaintext_loopback)
                .unwrap_or(true),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file() {
        let file: ServeConfigFile = toml::from_str(
            "data_dir = \"/a\"\nnbd_listen = \"127.0.0.1:1\"\nshutdown_grace_secs = 5\n",
        )
        .unwrap();
        let flags = ServeConfigFile {
            nbd_listen: Some("127.0.0.1:2".parse().unwrap()),
            ..Default::default()
        };
        let c = file.merge(flags).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/a"));
        assert_eq!(c.nbd_listen.port(), 2);
        assert_eq!(c.shutdown_grace_secs, 5);
        assert!(ServeConfigFile::default()
            .merge(ServeConfigFile::default())
            .is_err());
        assert!(toml::from_str::<ServeConfigFile>("bogus = 1").is_err());
    }
}
