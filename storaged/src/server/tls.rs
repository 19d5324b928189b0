//! The NBD server's TLS settings: which clients must upgrade with `NBD_OPT_STARTTLS`, and the
//! acceptor that makes them prove their host with a certificate of the cluster's CA.

use tokio_rustls::TlsAcceptor;

/// The NBD server's TLS settings.
#[derive(Clone)]
pub struct NbdTls {
    /// Accepts TLS sessions with this host's certificate; clients must present one of the
    /// cluster's CA.
    pub acceptor: TlsAcceptor,
    /// Clients on loopback may skip TLS (their lease option is then taken at its word):
    /// development on one machine only.
    pub plaintext_loopback: bool,
}

impl NbdTls {
    /// TLS from a host's TLS directory (see [`vmhop_common::tls`]), client certificates
    /// required.
    pub fn new(
        tls: &vmhop_common::tls::HostTls,
        plaintext_loopback: bool,
    ) -> Result<NbdTls, vmhop_common::tls::TlsError> {
        let cfg = tls.server_config(vmhop_common::tls::ClientCert::Required)?;
        Ok(NbdTls {
            acceptor: TlsAcceptor::from(cfg),
            plaintext_loopback,
        })
    }

    /// Whether a client at `peer` must upgrade to TLS before anything else.
    pub fn required_for(&self, peer: std::net::SocketAddr) -> bool {
        !(self.plaintext_loopback && peer.ip().is_loopback())
    }
}

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdTls")
            .field("plaintext_loopback", &self.plaintext_loopback)
            .finish_non_exhaustive()
    }
}
