//! `storaged volume import NAME FILE`: copies a raw image file into a volume.
//!
//! The copy goes over NBD, the data path every other client uses, not through a REST upload:
//! storaged's lease gate then keeps anyone else from writing to the volume while it runs, in
//! cluster mode the volume's master replicates it to its slaves like any write, and the same
//! TLS identities apply. It runs under a primary lease of its own, held by the certificate's
//! host (`--tls-dir`) or, in plaintext, by `--host-id` (default [`DEFAULT_HOST_ID`]), and
//! ends it through the REST API when the data is flushed, so that a guest can take the volume
//! next. Steps, each printed:
//! 1. the volume is created with the file's size (rounded up to 512 bytes) or `--size` if it
//!    does not exist; an existing one must be at least as large as the file;
//! 2. a primary lease of another host refuses the import (a guest may be using the volume),
//!    unless `--force`, which revokes that lease first;
//! 3. the file is written in chunks, [`DEPTH`] requests in flight; chunks of zeroes become
//!    `WRITE_ZEROES` (or nothing on a volume just created, which reads as zeroes);
//! 4. `NBD_CMD_FLUSH` (storaged `fdatasync`s the volume), disconnect, revoke the import's lease.

use super::{parse_size, ApiArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;
use storaged_client::api::{LeaseState, RevokeRequest, VolumeConfig};
use storaged_client::nbd::{Client, ClientConfig, ClientTls, LeaseSpec};
use storaged_client::protocol::RequestedState;
use storaged_client::rest::StoragedApi;
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;
use vmhop_common::tls::HostTls;

/// The lease holder of an import without TLS.
pub const DEFAULT_HOST_ID: &str = "storaged-import";
/// The instance id of the import's lease.
const INSTANCE: &str = "import";
/// Bytes per request (storaged takes up to 32 MiB).
const CHUNK: usize = 4 << 20;
/// Requests in flight.
const DEPTH: usize = 8;
/// Volumes are a whole number of these.
const SECTOR: u64 = 512;

/// `storaged volume import`'s arguments.
#[derive(Args)]
pub(crate) struct ImportArgs {
    /// Volume name (created if it does not exist).
    name: String,
    /// The raw image file (e.g. the guest's root file system, as `guest-images/build` prints
    /// it in GUEST_ROOTFS).
    file: PathBuf,
    /// Size of the volume when the import creates it: bytes, or with a K/M/G/T suffix
    /// [default: the file's size, rounded up to 512 bytes].
    #[arg(long)]
    size: Option<String>,
    /// Overwrite the volume even though another host holds its primary lease: that lease is
    /// revoked first (its connections are closed; a guest using the volume gets I/O errors).
    #[arg(long)]
    force: bool,
    /// storaged's NBD address; cluster mode: the nodes' addresses, comma-separated.
    #[arg(
        long,
        env = "STORAGED_NBD",
        default_value = "127.0.0.1:10809",
        value_delimiter = ','
    )]
    nbd: Vec<String>,
    /// A TLS directory (`storaged pki host`): NBD in TLS, the import's lease held by the host
    /// its certificate names (which the volume's host list must allow). Required when storaged
    /// takes no plaintext from this client.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// With --tls-dir: the host id in storaged's certificate [default: the IP of --nbd].
    #[arg(long, requires = "tls_dir")]
    server_name: Option<String>,
    /// Without --tls-dir: the host id the import's lease is held by [default: storaged-import].
    #[arg(long, conflicts_with = "tls_dir")]
    host_id: Option<String>,
    #[command(flatten)]
    api: ApiArgs,
}

/// What an import did (`--json` prints it).
#[derive(Serialize)]
struct ImportReport {
    volume: String,
    file: PathBuf,
    /// The import created the volume.
    created: bool,
    volume_size: u64,
    /// Bytes of the file, all written at offset 0.
    bytes: u64,
    /// Bytes sent as data; the rest were zeroes.
    data_bytes: u64,
    /// The host whose primary lease `--force` revoked.
    #[serde(skip_serializing_if = "Option::is_none")]
    revoked_primary: Option<String>,
    /// The host that held the import's lease (released at the end).
    lease_host: String,
    seconds: f64,
}

/// Runs `storaged volume import`.
pub(crate) async fn import(args: ImportArgs, json: bool) -> Result<()> {
    let started = Instant::now();
    let mut file = tokio::fs::File::open(&args.file)
        .await
        .with_context(|| format!("opening {}", args.file.display()))?;
    let len = file.metadata().await?.len();
    if len == 0 {
        bail!("{} is empty: nothing to import", args.file.display());
    }
    let (host, tls) = identity(&args)?;
    let api = args.api.clone().client()?;
    let say = |line: String| {
        if !json {
            println!("{line}");
        }
    };
    let (volume_size, created) = ensure_volume(&api, &args, len).await?;
    if created {
        say(format!(
            "created volume {} ({volume_size} bytes)",
            args.name
        ));
    }
    let revoked_primary = clear_primary(&api, &args.name, &host, args.force).await?;
    if let Some(h) = &revoked_primary {
        say(format!(
            "revoked host {h}'s primary lease on {} (--force)",
            args.name
        ));
    }
    let mut cfg = ClientConfig::new(args.nbd.clone(), &args.name).with_lease(LeaseSpec {
        host: host.clone(),
        instance: INSTANCE.into(),
        state: RequestedState::Primary,
        expected_epoch: 0,
    });
    if let Some(t) = tls {
        cfg = cfg.with_tls(t);
    }
    let client = Client::connect(&cfg).await.with_context(|| {
        format!(
            "opening volume {} over NBD at {} as host {host}",
            args.name,
            args.nbd.join(",")
        )
    })?;
    let copied = copy(&client, &mut file, len, created).await;
    let flushed = match copied {
        Ok(data) => client
            .flush()
            .await
            .context("flushing the volume")
            .map(|()| data),
        Err(e) => Err(e),
    };
    let _ = client.disconnect().await;
    let released = release(&api, &args.name, &host).await;
    let data_bytes = flushed.with_context(|| {
        format!(
            "importing {} into volume {}",
            args.file.display(),
            args.name
        )
    })?;
    released?;
    let report = ImportReport {
        volume: args.name.clone(),
        file: args.file.clone(),
        created,
        volume_size,
        bytes: len,
        data_bytes,
        revoked_primary,
        lease_host: host,
        seconds: started.elapsed().as_secs_f64(),
    };
    if json {
        return super::print_json(&report);
    }
    say(format!(
        "imported {} into volume {}: {} bytes at offset 0 ({} of data, {} of zeroes) in {:.2} s; \
         flushed to disk; the import's lease (host {}) released",
        report.file.display(),
        report.volume,
        report.bytes,
        report.data_bytes,
        report.bytes - report.data_bytes,
        report.seconds,
        report.lease_host,
    ));
    if report.volume_size > report.bytes {
        say(format!(
            "the volume's last {} bytes (after the file's end) were left as they were",
            report.volume_size - report.bytes
        ));
    }
    Ok(())
}

/// The host id the import's lease is held by, and the TLS settings that prove it.
fn identity(args: &ImportArgs) -> Result<(String, Option<ClientTls>)> {
    match &args.tls_dir {
        Some(dir) => {
            let host = HostTls::load(dir)
                .with_context(|| format!("reading the TLS directory {}", dir.display()))?;
            let tls = ClientTls::new(&host, args.server_name.clone())?;
            Ok((host.host_id().to_string(), Some(tls)))
        }
        None => Ok((
            args.host_id
                .clone()
                .unwrap_or_else(|| DEFAULT_HOST_ID.into()),
            None,
        )),
    }
}

/// The volume's size and whether this import created it.
async fn ensure_volume(api: &StoragedApi, args: &ImportArgs, len: u64) -> Result<(u64, bool)> {
    let size = args.size.as_deref().map(parse_size).transpose()?;
    match api.volume(&args.name).await {
        Ok(v) => {
            if let Some(s) = size.filter(|&s| s != v.config.size) {
                bail!(
                    "volume {} exists with {} bytes: --size ({s}) is only for a volume the \
                     import creates",
                    args.name,
                    v.config.size
                );
            }
            if v.config.size < len {
                bail!(
                    "volume {} has {} bytes, fewer than {} ({len} bytes)",
                    args.name,
                    v.config.size,
                    args.file.display()
                );
            }
            Ok((v.config.size, false))
        }
        Err(e) if e.status().map(|s| s.as_u16()) == Some(404) => {
            let size = size.unwrap_or(len.div_ceil(SECTOR) * SECTOR);
            if size < len {
                bail!(
                    "--size {size} is smaller than {} ({len} bytes)",
                    args.file.display()
                );
            }
            let v = api
                .create_volume(&VolumeConfig::new(&args.name, size))
                .await
                .with_context(|| format!("creating volume {}", args.name))?;
            Ok((v.config.size, true))
        }
        Err(e) => Err(e).with_context(|| format!("looking up volume {}", args.name)),
    }
}

/// Refuses (or with `force` revokes) a primary lease other than an earlier import's; returns
/// the host revoked.
async fn clear_primary(
    api: &StoragedApi,
    volume: &str,
    me: &str,
    force: bool,
) -> Result<Option<String>> {
    let view = api.leases(volume).await?;
    let Some(p) = view
        .leases
        .iter()
        // The same host's guest is another holder too: only a lease of an earlier import
        // that was cut off is this import's own.
        .find(|l| l.state == LeaseState::Primary && (l.host != me || l.instance != INSTANCE))
    else {
        return Ok(None);
    };
    if !force {
        bail!(
            "volume {volume} has a primary lease held by host {} (instance {}, {} connections): \
             a guest may be using it. Stop that guest (or `storaged lease revoke {volume} --host \
             {}` once it is gone), or import with --force to revoke the lease and overwrite the \
             volume",
            p.host,
            p.instance,
            p.connections,
            p.host
        );
    }
    let req = RevokeRequest {
        host: p.host.clone(),
        only_if: Some(LeaseState::Primary),
    };
    api.revoke(volume, &req)
        .await
        .with_context(|| format!("revoking host {}'s primary lease", p.host))?;
    Ok(Some(p.host.clone()))
}

/// Ends the import's own lease (it stays primary after the connection closed otherwise).
async fn release(api: &StoragedApi, volume: &str, me: &str) -> Result<()> {
    let req = RevokeRequest {
        host: me.to_string(),
        only_if: Some(LeaseState::Primary),
    };
    api.revoke(volume, &req).await.with_context(|| {
        format!(
            "releasing the import's lease: run `storaged lease revoke {volume} --host {me}` \
             before a guest uses the volume"
        )
    })?;
    Ok(())
}

/// Writes the file's `len` bytes at offset 0, [`DEPTH`] requests in flight; returns the bytes
/// sent as data. Zero chunks become `WRITE_ZEROES`, or nothing on a `fresh` volume.
async fn copy(client: &Client, file: &mut tokio::fs::File, len: u64, fresh: bool) -> Result<u64> {
    let chunk = CHUNK.min(client.max_request() as usize);
    let mut inflight: JoinSet<Result<(), storaged_client::nbd::ClientError>> = JoinSet::new();
    let (mut offset, mut data_bytes) = (0u64, 0u64);
    while offset < len {
        let n = chunk.min((len - offset) as usize);
        let mut buf = vec![0u8; n];
        file.read_exact(&mut buf)
            .await
            .with_context(|| format!("reading the file at offset {offset}"))?;
        while inflight.len() >= DEPTH {
            if let Some(r) = inflight.join_next().await {
                r?.with_context(|| "writing to the volume")?;
            }
        }
        let c = client.clone();
        let at = offset;
        if buf.iter().all(|&b| b == 0) {
            if !fresh {
                inflight.spawn(async move { c.write_zeroes(at, n as u32, false, false).await });
            }
        } else {
            data_bytes += n as u64;
            inflight.spawn(async move { c.write(at, buf, false).await });
        }
        offset += n as u64;
    }
    while let Some(r) = inflight.join_next().await {
        r?.with_context(|| "writing to the volume")?;
    }
    Ok(data_bytes)
}
