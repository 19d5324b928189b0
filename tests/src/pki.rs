//! A cluster CA and host TLS directories for the tests, made with the documented commands
//! (`storaged pki ca`, `storaged pki host`), and the TLS settings the project's clients take
//! from them.

use crate::process::run_ok;
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::Command;
use storaged_client::nbd::ClientTls;
use vmhop_common::tls::HostTls;

/// A CA and the TLS directories of the hosts issued by it.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Makes a CA named `name` in `dir/name`.
    pub fn new(dir: &Path, name: &str) -> Result<Pki> {
        let dir = dir.join(name);
        run_ok(
            Command::new(crate::binary("storaged"))
                .args(["pki", "ca", "--name", name, "--dir"])
                .arg(dir.join("ca")),
        )?;
        Ok(Pki { dir })
    }

    /// Issues `host`'s certificate (valid for 127.0.0.1 too) and returns its TLS directory.
    pub fn host(&self, host: &str) -> Result<PathBuf> {
        let out = self.dir.join(host);
        if !out.exists() {
            run_ok(
                Command::new(crate::binary("storaged"))
                    .args(["pki", "host", host, "--ip", "127.0.0.1", "--ca"])
                    .arg(self.dir.join("ca"))
                    .arg("--out")
                    .arg(&out),
            )?;
        }
        Ok(out)
    }

    /// Issues `host`'s certificate valid for the addresses `ips` too (standard clients such as
    /// qemu-img check the address they connect to); returns its TLS directory.
    pub fn host_at(&self, host: &str, ips: &[std::net::IpAddr]) -> Result<PathBuf> {
        let out = self.dir.join(host);
        if !out.exists() {
            let mut cmd = Command::new(crate::binary("storaged"));
            cmd.args(["pki", "host", host, "--ip", "127.0.0.1"]);
            for ip in ips {
                cmd.arg("--ip").arg(ip.to_string());
            }
            run_ok(
                cmd.arg("--ca")
                    .arg(self.dir.join("ca"))
                    .arg("--out")
                    .arg(&out),
            )?;
        }
        Ok(out)
    }

    /// A TLS directory holding only the CA's certificate (a client without one of its own).
    pub fn ca_only(&self) -> Result<PathBuf> {
        let out = self.dir.join("ca-only");
        std::fs::create_dir_all(&out)?;
        std::fs::copy(
            self.dir.join("ca").join(vmhop_common::tls::CA_CERT),
            out.join(vmhop_common::tls::CA_CERT),
        )?;
        Ok(out)
    }

    /// The NBD client TLS settings of `host`, checking that the server is `server`.
    pub fn client(&self, host: &str, server: &str) -> Result<ClientTls> {
        self.client_checking(host, Some(server.to_string()))
    }

    /// The NBD client TLS settings of `host`, checking the server against `server_name` or,
    /// when `None`, against the address it is reached at.
    pub fn client_checking(&self, host: &str, server_name: Option<String>) -> Result<ClientTls> {
        let tls = HostTls::load(&self.host(host)?)?;
        Ok(ClientTls::new(&tls, server_name)?)
    }
}
