//! TLS with the cluster's host certificates: who a peer is comes from its certificate, never
//! from what it says about itself.
//!
//! Every host of a cluster has a certificate signed by the cluster's CA; the host id is the
//! certificate's first DNS subject alternative name (its common name when it has none). The
//! same certificate serves as server certificate (storaged's NBD port, a destination VMM's
//! migration listener, migrated's peer API) and as client certificate (a VMM's connection to
//! storaged, a source VMM's stream, a call to a peer).
//!
//! A host's TLS directory uses the file names of QEMU's `tls-creds-x509` and libnbd's
//! `tls-certificates`, so that qemu-img, qemu-io, qemu-nbd and nbdinfo can use it as it is:
//!
//! | file | what |
//! |---|---|
//! | `ca-cert.pem` | the cluster CA's certificate (the trust anchor) |
//! | `server-cert.pem`, `server-key.pem` | the host's certificate and key, for serving |
//! | `client-cert.pem`, `client-key.pem` | the host's certificate and key, for connecting |
//!
//! `storaged pki host` writes both pairs from one certificate (see [`crate::pki`]).
//! Peers are checked against the CA; a server is also checked against the name its client
//! expects (its host id, or the IP address it was reached at).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// The CA certificate's file name in a TLS directory.
pub const CA_CERT: &str = "ca-cert.pem";
/// The server certificate's file name.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server key's file name.
pub const SERVER_KEY: &str = "server-key.pem";
/// The client certificate's file name.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The client key's file name.
pub const CLIENT_KEY: &str = "client-key.pem";

/// A TLS directory that cannot be used, or a peer that is not who it must be.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file could not be read or holds no PEM object of the kind expected.
    #[error("reading {0}")]
    Read(PathBuf, #[source] rustls::pki_types::pem::Error),
    /// A certificate file holds no certificate.
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
    /// A certificate is not valid X.509.
    #[error("{0} is not a valid X.509 certificate")]
    Parse(String),
    /// A certificate names no host (no DNS subject alternative name, no common name).
    #[error("the certificate {0} names no host (no DNS name, no common name)")]
    NoIdentity(String),
    /// The server and client certificates of one directory name different hosts.
    #[error("{dir}: the server certificate is for {server}, the client certificate for {client}")]
    Mismatch {
        /// The directory.
        dir: PathBuf,
        /// The server certificate's host.
        server: String,
        /// The client certificate's host.
        client: String,
    },
    /// The directory has no certificate for this role.
    #[error("{0} has no {1}")]
    Missing(PathBuf, &'static str),
    /// rustls refused the material.
    #[error("TLS configuration")]
    Rustls(#[from] rustls::Error),
    /// The CA certificate cannot anchor client verification.
    #[error("client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// A name to check a server against is neither a DNS name nor an IP address.
    #[error("{0:?} is not a host name or an IP address")]
    ServerName(String),
}

/// One identity: a certificate chain and its key.
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Identity {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// A host's TLS material: the cluster's CA and the host's own certificate(s).
#[derive(Clone)]
pub struct HostTls {
    dir: PathBuf,
    roots: Arc<RootCertStore>,
    server: Option<Identity>,
    client: Option<Identity>,
    host_id: String,
}

impl std::fmt::Debug for HostTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTls")
            .field("dir", &self.dir)
            .field("host_id", &self.host_id)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Read(path.into(), e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Read(path.into(), e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.into()));
    }
    Ok(certs)
}

fn read_identity(dir: &Path, cert: &str, key: &str) -> Result<Option<Identity>, TlsError> {
    let (cert_path, key_path) = (dir.join(cert), dir.join(key));
    if !cert_path.exists() {
        return Ok(None);
    }
    let chain = read_certs(&cert_path)?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::Read(key_path, e))?;
    Ok(Some(Identity { chain, key }))
}

impl HostTls {
    /// Reads the TLS directory `dir`: the CA certificate and at least one of the server and
    /// client pairs (both must name the same host).
    pub fn load(dir: &Path) -> Result<HostTls, TlsError> {
        let ca_path = dir.join(CA_CERT);
        let mut roots = RootCertStore::empty();
        for c in read_certs(&ca_path)? {
            roots.add(c)?;
        }
        let server = read_identity(dir, SERVER_CERT, SERVER_KEY)?;
        let client = read_identity(dir, CLIENT_CERT, CLIENT_KEY)?;
        let id_of = |i: &Option<Identity>| -> Result<Option<String>, TlsError> {
            i.as_ref().map(|i| host_id_of(&i.chain[0])).transpose()
        };
        let host_id = match (id_of(&server)?, id_of(&client)?) {
            (Some(s), Some(c)) if s != c => {
                return Err(TlsError::Mismatch {
                    dir: dir.into(),
                    server: s,
                    client: c,
                })
            }
            (Some(id), _) | (None, Some(id)) => id,
            (None, None) => return Err(TlsError::Missing(dir.into(), SERVER_CERT)),
        };
        Ok(HostTls {
            dir: dir.into(),
            roots: Arc::new(roots),
            server,
            client,
            host_id,
        })
    }

    /// The host id this directory's certificate proves.
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// The directory the material was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A server configuration: this host's server certificate; clients must present a
    /// certificate of the cluster's CA when `client_cert` is [`ClientCert::Required`].
    pub fn server_config(&self, client_cert: ClientCert) -> Result<Arc<ServerConfig>, TlsError> {
        let id = self
            .server
            .clone()
            .ok_or_else(|| TlsError::Missing(self.dir.clone(), SERVER_CERT))?;
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider());
        let verifier = match client_cert {
            ClientCert::Required => verifier.build()?,
            ClientCert::Optional => verifier.allow_unauthenticated().build()?,
        };
        let cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(id.chain, id.key)?;
        Ok(Arc::new(cfg))
    }

    /// A client configuration: servers must have a certificate of the cluster's CA for the
    /// name the caller checks them against; this host presents its client certificate.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let id = self
            .client
            .clone()
            .ok_or_else(|| TlsError::Missing(self.dir.clone(), CLIENT_CERT))?;
        let cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(id.chain, id.key)?;
        Ok(Arc::new(cfg))
    }
}

/// Whether a server asks its clients for a certificate it then requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCert {
    /// Every client proves its identity.
    Required,
    /// Clients may come without a certificate (they are then anonymous); one they present is
    /// still checked.
    Optional,
}

/// The name to check a server's certificate against: a host id (a DNS name in the
/// certificate) or an IP address (an IP address in it).
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName(name.into()))
}

/// The host id a certificate proves: its first DNS subject alternative name, else its common
/// name.
pub fn host_id_of(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::Parse(e.to_string()))?;
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                return Ok(d.to_string());
            }
        }
    }
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    cn.ok_or_else(|| TlsError::NoIdentity(parsed.subject().to_string()))
}

/// The host id of the peer of an established TLS session (`None` without a certificate).
pub fn peer_host_id(state: &rustls::CommonState) -> Result<Option<String>, TlsError> {
    state
        .peer_certificates()
        .and_then(|c| c.first())
        .map(host_id_of)
        .transpose()
}

#[cfg(all(test, feature = "pki"))]
mod tests {
    use super::*;
    use crate::pki::{create_ca, issue_host, HostCertRequest};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A CA in `dir/name` and a host directory `dir/host` signed by it.
    fn host(dir: &Path, ca: &str, host: &str) -> HostTls {
        let ca_dir = dir.join(ca);
        if !ca_dir.join(crate::pki::CA_KEY).exists() {
            create_ca(&ca_dir, ca, 1).unwrap();
        }
        let req = HostCertRequest {
            host_id: host.into(),
            ips: vec!["127.0.0.1".parse().unwrap()],
            dns_names: vec![],
            days: 1,
        };
        let out = dir.join(format!("{ca}-{host}"));
        issue_host(&ca_dir, &req, &out).unwrap();
        HostTls::load(&out).unwrap()
    }

    /// One TLS session over loopback: the server's view of the client's identity, or the
    /// failure of either side.
    async fn session(
        server: &HostTls,
        client: &HostTls,
        name: &str,
    ) -> Result<Option<String>, String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor =
            tokio_rustls::TlsAcceptor::from(server.server_config(ClientCert::Required).unwrap());
        let srv = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(s).await.map_err(|e| e.to_string())?;
            let who = peer_host_id(tls.get_ref().1).map_err(|e| e.to_string())?;
            tls.write_all(b"ok").await.map_err(|e| e.to_string())?;
            tls.shutdown().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(who)
        });
        let connector = tokio_rustls::TlsConnector::from(client.client_config().unwrap());
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let client_side = async {
            let mut tls = connector
                .connect(server_name(name).unwrap(), s)
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = Vec::new();
            tls.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(buf)
        }
        .await;
        let server_side = srv.await.unwrap();
        client_side?;
        server_side
    }

    #[tokio::test]
    async fn identities_come_from_certificates_of_the_cluster_ca() {
        let dir = tempfile::tempdir().unwrap();
        let storage = host(dir.path(), "ca", "storage");
        let a = host(dir.path(), "ca", "a");
        let stranger = host(dir.path(), "other-ca", "a");

        // The server learns who the client is from its certificate; the client checks the
        // server by host id or by the IP address in its certificate.
        assert_eq!(session(&storage, &a, "storage").await, Ok(Some("a".into())));
        assert_eq!(
            session(&storage, &a, "127.0.0.1").await,
            Ok(Some("a".into()))
        );
        // A server that is not the one the client expects is refused.
        assert!(session(&storage, &a, "b").await.is_err());
        // A certificate of another CA proves nothing, whatever host it names.
        assert!(session(&storage, &stranger, "storage").await.is_err());
        assert!(session(&stranger, &a, "a").await.is_err());
    }
}
