//! Making the cluster's CA and its hosts' certificates (`storaged pki ca` / `storaged pki
//! host`, and the test rig).
//!
//! The CA directory holds `ca-cert.pem` and `ca-key.pem` (mode 0600; keep it off the hosts).
//! A host's certificate names its host id as DNS subject alternative name and common name
//! (the identity [`crate::tls`] reads back), plus any IP addresses and further DNS names the
//! host is reached at (standard clients such as qemu-img check the address they connect to),
//! and may serve as both server and client certificate. Keys are ECDSA P-256.

use crate::tls::{CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The CA key's file name in the CA directory.
pub const CA_KEY: &str = "ca-key.pem";

/// A certificate that could not be made.
#[derive(Debug, Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// The CA exists already (it is never overwritten).
    #[error("{0} exists: a CA is made once (remove the directory to start over)")]
    Exists(PathBuf),
    /// The host id cannot be a certificate's DNS name.
    #[error(
        "host id {0:?} cannot name a certificate: use 1-63 of [a-z0-9-], not starting or \
         ending with '-'"
    )]
    HostId(String),
    /// A DNS name is not valid.
    #[error("{0:?} is not a valid DNS name")]
    DnsName(String),
    /// The certificate could not be generated or signed.
    #[error("generating the certificate")]
    Generate(#[from] rcgen::Error),
}

/// What a host certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCertRequest {
    /// The host id (the identity every daemon reads from the certificate).
    pub host_id: String,
    /// IP addresses the host is reached at.
    pub ips: Vec<IpAddr>,
    /// Further DNS names the host is reached at.
    pub dns_names: Vec<String>,
    /// Validity in days.
    pub days: u32,
}

/// Whether `id` can be a host id: a DNS label, lower case.
pub fn valid_host_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && !id.starts_with('-')
        && !id.ends_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    use std::io::Write;
    let io = |e| PkiError::Io(path.to_path_buf(), e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

fn read_file(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|e| PkiError::Io(path.to_path_buf(), e))
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days.into());
}

/// Makes a new cluster CA named `name` in `dir` (created if missing), valid for `days`.
pub fn create_ca(dir: &Path, name: &str, days: u32) -> Result<(), PkiError> {
    let key_path = dir.join(CA_KEY);
    if key_path.exists() {
        return Err(PkiError::Exists(key_path));
    }
    std::fs::create_dir_all(dir).map_err(|e| PkiError::Io(dir.into(), e))?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_file(&key_path, &key.serialize_pem(), 0o600)?;
    write_file(&dir.join(CA_CERT), &cert.pem(), 0o644)
}

/// Issues a certificate for `req` with the CA in `ca_dir` and writes a host TLS directory
/// to `out` (created if missing): the CA certificate and the host's certificate and key under
/// both the server and the client names.
pub fn issue_host(ca_dir: &Path, req: &HostCertRequest, out: &Path) -> Result<(), PkiError> {
    if !valid_host_id(&req.host_id) {
        return Err(PkiError::HostId(req.host_id.clone()));
    }
    let ca_pem = read_file(&ca_dir.join(CA_CERT))?;
    let ca_key = KeyPair::from_pem(&read_file(&ca_dir.join(CA_KEY))?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;

    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, req.host_id.as_str());
    let dns = |n: &str| {
        n.to_string()
            .try_into()
            .map(SanType::DnsName)
            .map_err(|_| PkiError::DnsName(n.into()))
    };
    params.subject_alt_names.push(dns(&req.host_id)?);
    for n in &req.dns_names {
        params.subject_alt_names.push(dns(n)?);
    }
    for ip in &req.ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, req.days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;

    std::fs::create_dir_all(out).map_err(|e| PkiError::Io(out.into(), e))?;
    write_file(&out.join(CA_CERT), &ca_pem, 0o644)?;
    for (c, k) in [(SERVER_CERT, SERVER_KEY), (CLIENT_CERT, CLIENT_KEY)] {
        write_file(&out.join(c), &cert.pem(), 0o644)?;
        write_file(&out.join(k), &key.serialize_pem(), 0o600)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::HostTls;

    #[test]
    fn a_host_certificate_proves_its_host_id() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        create_ca(&ca, "test cluster", 30).unwrap();
        assert!(matches!(
            create_ca(&ca, "again", 30),
            Err(PkiError::Exists(_))
        ));
        let req = HostCertRequest {
            host_id: "host-a".into(),
            ips: vec!["127.0.0.1".parse().unwrap()],
            dns_names: vec!["localhost".into()],
            days: 1,
        };
        let out = dir.path().join("host-a");
        issue_host(&ca, &req, &out).unwrap();
        let tls = HostTls::load(&out).unwrap();
        assert_eq!(tls.host_id(), "host-a");
        tls.server_config(crate::tls::ClientCert::Required).unwrap();
        tls.client_config().unwrap();
        let mode = std::fs::metadata(out.join(SERVER_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "keys are private");

        let bad = HostCertRequest {
            host_id: "Host A".into(),
            ..req
        };
        assert!(matches!(
            issue_host(&ca, &bad, &out),
            Err(PkiError::HostId(_))
        ));
    }
}
