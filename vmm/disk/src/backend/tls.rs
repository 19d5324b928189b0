//! Who a storaged disk connects as: its host id, and over TLS the host's certificate that
//! proves it.
//!
//! With a TLS directory the host id is the certificate's (storaged refuses a lease option
//! naming anyone else): a configured `host_id` must be that same id, and without one it is
//! taken from the certificate. storaged's own certificate is checked against `server_name`, or
//! the address connected to. Without a TLS directory the connection is plaintext and the host
//! id is taken at its word, which storaged accepts only from loopback, if at all.

use super::BackendError;
use storaged_client::nbd::ClientTls;
use vmhop_common::tls::HostTls;
use vmm_api::config::StoragedDiskConfig;

/// The identity of a storaged disk's connections.
pub(super) struct DiskIdentity {
    /// The lease holder's host id.
    pub host: String,
    /// The TLS settings, `None` for plaintext.
    pub tls: Option<ClientTls>,
}

impl DiskIdentity {
    /// Reads the disk's TLS directory, if it has one, and settles its host id.
    pub(super) fn of(cfg: &StoragedDiskConfig) -> Result<DiskIdentity, BackendError> {
        let Some(dir) = &cfg.tls_dir else {
            let host = cfg.host_id.clone().ok_or(BackendError::NoHostId)?;
            tracing::warn!(volume = %cfg.volume, host = %host, address = %cfg.address,
                "storaged disk without tls_dir: plaintext, the host id is not proven \
                 (storaged takes this only from loopback clients, if at all)");
            return Ok(DiskIdentity { host, tls: None });
        };
        let tls = HostTls::load(dir).map_err(|e| BackendError::Tls(dir.clone(), e))?;
        let proven = tls.host_id().to_string();
        if let Some(configured) = cfg.host_id.as_ref().filter(|c| **c != proven) {
            return Err(BackendError::HostMismatch {
                configured: configured.clone(),
                dir: dir.clone(),
                certificate: proven,
            });
        }
        let client = ClientTls::new(&tls, cfg.server_name.clone())
            .map_err(|e| BackendError::Tls(dir.clone(), e))?;
        Ok(DiskIdentity {
            host: proven,
            tls: Some(client),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::testing::{runtime, storaged_apart};
    use crate::backend::StoragedBackend;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;
    use storaged::registry::Registry;
    use storaged::server::NbdTls;
    use storaged_client::api::VolumeConfig;
    use vmhop_common::pki::{create_ca, issue_host, HostCertRequest};
    use vmm_api::config::LeaseMode;

    /// `dir/host`: a TLS directory of the CA in `dir/ca`, valid for 127.0.0.1.
    fn host(dir: &Path, host: &str) -> std::path::PathBuf {
        let ca = dir.join("ca");
        if !ca.exists() {
            create_ca(&ca, "test", 1).unwrap();
        }
        let req = HostCertRequest {
            host_id: host.into(),
            ips: vec!["127.0.0.1".parse().unwrap()],
            dns_names: vec![],
            days: 1,
        };
        issue_host(&ca, &req, &dir.join(host)).unwrap();
        dir.join(host)
    }

    fn disk(addr: &str, host_id: Option<&str>, tls_dir: &Path) -> StoragedDiskConfig {
        StoragedDiskConfig {
            address: addr.into(),
            addresses: Vec::new(),
            volume: "v".into(),
            host_id: host_id.map(str::to_string),
            instance_id: None,
            lease: LeaseMode::Primary,
            io_hold_secs: None,
            tls_dir: Some(tls_dir.to_path_buf()),
            server_name: Some("storage".into()),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_certificate_names_the_lease_holder() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Arc::new(Registry::open(&dir.path().join("data")).unwrap());
        reg.create(VolumeConfig::new("v", 1 << 20)).await.unwrap();
        let storage = HostTls::load(&host(dir.path(), "storage")).unwrap();
        let nbd = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = nbd.local_addr().unwrap().to_string();
        let (_stop, rx) = tokio::sync::watch::channel(false);
        // TLS required even on loopback.
        let tls = NbdTls::new(&storage, false).unwrap();
        tokio::spawn(storaged::server::run(
            nbd,
            reg.clone(),
            Some(tls),
            rx,
            Duration::from_secs(1),
        ));
        let a = host(dir.path(), "a");

        // No host id given: the certificate's; the lease is a's.
        let d = StoragedBackend::connect(&disk(&addr, None, &a), "vm1")
            .await
            .unwrap();
        d.write(0, vec![7; 4096]).await.unwrap();
        let leases = reg.get("v").unwrap().lease_view();
        assert!(format!("{leases:?}").contains("\"a\""), "{leases:?}");
        drop(d);

        // Another host id than the certificate's: refused before any connection.
        let e = StoragedBackend::connect(&disk(&addr, Some("b"), &a), "vm1")
            .await
            .unwrap_err();
        assert!(matches!(e, BackendError::HostMismatch { .. }), "{e:?}");
        assert!(e.to_string().contains("proves host \"a\""), "{e}");
        // Plaintext: storaged refuses it.
        let mut plain = disk(&addr, Some("a"), &a);
        (plain.tls_dir, plain.server_name) = (None, None);
        assert!(StoragedBackend::connect(&plain, "vm1").await.is_err());
    }

    /// Requests sent while storaged reads nothing fill the socket; a request whose bytes the
    /// TLS layer then holds back must still go out once storaged reads again, although its
    /// sender is by then only waiting for the reply: every request is answered.
    /// The same for replies: large reads, one at a time, while the client (receiving and
    /// decrypting) is the slower end.
    #[test]
    fn replies_sent_into_a_full_tls_socket_reach_the_client() {
        const ROUNDS: usize = 100;
        let (_dir, rt, d, _storaged) = tls_disk();
        rt.block_on(async {
            for round in 0..ROUNDS {
                let read = d.read(0, 8 << 20);
                match tokio::time::timeout(Duration::from_secs(60), read).await {
                    Ok(r) => assert_eq!(r.unwrap().len(), 8 << 20),
                    Err(_) => panic!("read {round} never answered"),
                }
            }
        });
    }

    /// A volume of a TLS storaged that runs on a runtime of its own (one worker, as a busy
    /// separate process), and a disk on it from a VMM-sized runtime (two workers).
    fn tls_disk() -> (
        tempfile::TempDir,
        tokio::runtime::Runtime,
        StoragedBackend,
        (tokio::runtime::Runtime, tokio::sync::watch::Sender<bool>),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let storage = HostTls::load(&host(dir.path(), "storage")).unwrap();
        let tls = NbdTls::new(&storage, false).unwrap();
        let (storaged_rt, addr, stop) = storaged_apart(&dir.path().join("data"), Some(tls));
        let vmm_rt = runtime(2);
        let a = host(dir.path(), "a");
        let d = vmm_rt
            .block_on(StoragedBackend::connect(&disk(&addr, None, &a), "vm1"))
            .unwrap();
        (dir, vmm_rt, d, (storaged_rt, stop))
    }

    /// As a guest does: one large write, then wait for it. storaged (receiving and
    /// decrypting) is the slower end, so the socket is often full when a request's last bytes
    /// go out: they must reach storaged although the client then only waits for the reply.
    #[test]
    fn requests_sent_into_a_full_tls_socket_reach_storaged() {
        const ROUNDS: usize = 100;
        let (_dir, rt, d, _storaged) = tls_disk();
        rt.block_on(async {
            for round in 0..ROUNDS {
                let write = d.write(0, vec![round as u8; 8 << 20]);
                if tokio::time::timeout(Duration::from_secs(60), write)
                    .await
                    .is_err()
                {
                    panic!("write {round} never answered");
                }
            }
        });
    }
}
