//! Server side of the fixed newstyle handshake, including `NBD_OPT_STARTTLS` and the lease
//! option.
//!
//! Over TLS the connection's identity is the host id of the client's certificate, and a
//! lease option naming another host is refused: a client cannot claim to be a host it holds no
//! certificate for. In plaintext (no TLS configured, or a loopback client where that is
//! allowed) the lease option is taken at its word.
//!
//! Each option's bytes are decoded by [`ClientOption::decode`]; this module decides what to do
//! with them: the export (an empty name is the configured default export), the metadata
//! context `base:allocation` (see [`storaged_client::meta`]), the info items and the lease.

use crate::lease::{LeaseError, LeaseRequest};
use crate::metrics::ConnRefusal;
use crate::registry::{Attachment, Registry, RegistryError};
use crate::server::ServerConfig;
use crate::volume::Volume;
use std::net::SocketAddr;
use std::sync::Arc;
use storaged_client::api::{AnonymousPolicy, Holder};
use storaged_client::meta::{
    encode_meta_context, matches_base_allocation, MetaContextOption, BASE_ALLOCATION,
    BASE_ALLOCATION_ID, NBD_OPT_SET_META_CONTEXT, NBD_REP_META_CONTEXT,
};
use storaged_client::option::ClientOption;
use storaged_client::protocol::*;
use storaged_client::stream::NbdStream;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// More options than this in one handshake is treated as abuse.
const MAX_OPTIONS: usize = 256;
/// The text of `NBD_REP_ERR_TLS_REQD`.
const TLS_REQUIRED: &[u8] = b"this server requires TLS (NBD_OPT_STARTTLS) with a client \
    certificate of the cluster's CA";

/// A handshake that ended without reaching transmission.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// Socket error or the client went away.
    #[error("connection")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol.
    #[error("protocol violation")]
    Protocol(#[from] ProtocolError),
    /// The client's flags are unknown.
    #[error("unknown client flags {0:#x}")]
    ClientFlags(u32),
    /// Option data above the limit.
    #[error("option {option} data of {length} bytes exceeds the limit")]
    OptionTooBig {
        /// Option number.
        option: u32,
        /// Declared length.
        length: u32,
    },
    /// Too many options.
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
    /// `NBD_OPT_EXPORT_NAME` could not be satisfied (the protocol has no error reply for it).
    #[error("export {0} refused")]
    ExportRefused(String, #[source] RegistryError),
    /// `NBD_OPT_EXPORT_NAME` with a name that is not UTF-8 (no error reply possible).
    #[error("malformed export name")]
    ExportName(#[source] ProtocolError),
    /// `NBD_OPT_EXPORT_NAME` in plaintext where TLS is required (no error reply possible).
    #[error("export {0} asked for without TLS, which this server requires")]
    TlsRequired(String),
    /// The TLS handshake after `NBD_OPT_STARTTLS` failed (no certificate of the cluster, ...).
    #[error("TLS handshake")]
    Tls(#[source] std::io::Error),
    /// The client's certificate names no usable host.
    #[error("client certificate")]
    Identity(#[from] vmhop_common::tls::TlsError),
}

/// The outcome of a successful handshake.
pub struct Negotiated {
    /// The volume.
    pub vol: Arc<Volume>,
    /// The connection's lease and gate.
    pub att: Attachment,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The client selected `base:allocation`: it may send `NBD_CMD_BLOCK_STATUS`.
    pub block_status: bool,
}

/// Transmission flags of every export; read-only ones lose the writing commands.
fn transmission_flags(read_only: bool) -> u16 {
    let base = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_CAN_MULTI_CONN
        | NBD_FLAG_SEND_CACHE
        | NBD_FLAG_SEND_DF;
    if read_only {
        base | NBD_FLAG_READ_ONLY
    } else {
        base | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_SEND_FAST_ZERO
    }
}

fn anonymous_read_only(vol: &Volume) -> bool {
    vol.access().anonymous != AnonymousPolicy::ReadWriteWithoutPrimary
}

/// Why a client without a lease may only read, and how to write: standard tools see only the
/// export's read-only flag and say "Permission denied", so this goes into the export's
/// description (`nbdinfo` shows it) and storaged's log.
fn read_only_note(vol: &Volume) -> String {
    let policy = serde_json::to_value(vol.access().anonymous)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    format!(
        "read-only for clients without a lease (anonymous access {policy}); to write an image \
         to it: storaged volume import {name} FILE, or storaged volume set-access {name} \
         read-write-without-primary",
        name = vol.config.name
    )
}

/// Why a refused attach turned the connection away, for the metrics.
pub(super) fn refusal_reason(e: &RegistryError) -> ConnRefusal {
    match e {
        RegistryError::NotFound(_) => ConnRefusal::UnknownExport,
        RegistryError::Busy(..) => ConnRefusal::VolumeConnectionLimit,
        RegistryError::Anonymous(_) => ConnRefusal::Anonymous,
        RegistryError::Lease(_) | RegistryError::NotAllowed(_) | RegistryError::StandbyLimit(_) => {
            ConnRefusal::Lease
        }
        _ => ConnRefusal::Handshake,
    }
}

/// Maps a refused attach to the option reply code.
fn refusal_code(e: &RegistryError) -> u32 {
    match e {
        RegistryError::NotFound(_) => NBD_REP_ERR_UNKNOWN,
        RegistryError::Lease(LeaseError::Deactivated { .. }) => NBD_REP_ERR_LEASE_DEACTIVATED,
        RegistryError::Lease(LeaseError::AlreadyPrimary { .. }) => {
            NBD_REP_ERR_LEASE_ALREADY_PRIMARY
        }
        RegistryError::Lease(LeaseError::Conflict { .. }) => NBD_REP_ERR_LEASE_CONFLICT,
        RegistryError::Lease(LeaseError::Epoch { .. }) => NBD_REP_ERR_LEASE_EPOCH,
        // The master that could not write to etcd ended its term: another node will serve.
        RegistryError::NotMaster { .. }
        | RegistryError::Deposed { .. }
        | RegistryError::Etcd(_)
        | RegistryError::EtcdUnavailable(_)
        | RegistryError::EtcdUnreadable(_) => NBD_REP_ERR_NOT_MASTER,
        _ => NBD_REP_ERR_POLICY,
    }
}

async fn reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    reply: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let h = OptionReplyHeader {
        option,
        reply,
        length: data.len() as u32,
    };
    s.write_all(&h.encode()).await?;
    s.write_all(data).await?;
    s.flush().await
}

/// What the client has negotiated so far.
struct Haggle<'a> {
    reg: &'a Registry,
    cfg: &'a ServerConfig,
    peer: SocketAddr,
    no_zeroes: bool,
    structured: bool,
    lease: Option<LeaseOption>,
    /// The host id the client's certificate proves, once in TLS.
    identity: Option<String>,
    /// The (resolved) export for which the client selected `base:allocation`.
    block_status_for: Option<String>,
}

/// What one option led to.
enum Step {
    /// Go on with the next option.
    Next,
    /// The client aborted.
    Abort,
    /// Transmission starts.
    Transmission(Negotiated),
}

/// Runs the handshake on `stream`. `Ok(None)`: the client aborted cleanly; otherwise the
/// connection (upgraded to TLS if the client asked) and what was negotiated.
pub async fn handshake(
    stream: NbdStream,
    reg: &Registry,
    peer: SocketAddr,
    cfg: &ServerConfig,
    shutting_down: impl Fn() -> bool,
) -> Result<Option<(NbdStream, Negotiated)>, HandshakeError> {
    let mut stream = stream;
    let s = &mut stream;
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).await?;
    s.flush().await?;
    let cflags = s.read_u32().await?;
    if cflags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::ClientFlags(cflags));
    }
    let mut h = Haggle {
        reg,
        cfg,
        peer,
        no_zeroes: cflags & NBD_FLAG_C_NO_ZEROES != 0,
        structured: false,
        lease: None,
        identity: None,
        block_status_for: None,
    };
    let tls_required = cfg.tls.as_ref().is_some_and(|t| t.required_for(peer));

    for _ in 0..MAX_OPTIONS {
        let mut hb = [0u8; 16];
        s.read_exact(&mut hb).await?;
        let header = OptionHeader::decode(&hb)?;
        if header.length > MAX_OPTION_LEN {
            return Err(HandshakeError::OptionTooBig {
                option: header.option,
                length: header.length,
            });
        }
        let mut data = vec![0u8; header.length as usize];
        s.read_exact(&mut data).await?;
        let opt = header.option;
        if shutting_down() && opt != NBD_OPT_ABORT {
            reply(s, opt, NBD_REP_ERR_SHUTDOWN, b"server shutting down").await?;
            continue;
        }
        let decoded = ClientOption::decode(opt, &data);
        if tls_required && !s.is_tls() && opt != NBD_OPT_STARTTLS && opt != NBD_OPT_ABORT {
            if let Ok(ClientOption::ExportName(name)) = decoded {
                return Err(HandshakeError::TlsRequired(name));
            }
            reply(s, opt, NBD_REP_ERR_TLS_REQD, TLS_REQUIRED).await?;
            continue;
        }
        let option = match decoded {
            Ok(o) => o,
            Err(e) if opt == NBD_OPT_EXPORT_NAME => return Err(HandshakeError::ExportName(e)),
            Err(e) => {
                if opt == NBD_OPT_LEASE {
                    tracing::warn!(%peer, error = %e, "malformed lease option");
                }
                reply(s, opt, NBD_REP_ERR_INVALID, e.to_string().as_bytes()).await?;
                continue;
            }
        };
        match h.option(s, opt, option).await? {
            Step::Next => {}
            Step::Abort => return Ok(None),
            Step::Transmission(neg) => return Ok(Some((stream, neg))),
        }
    }
    Err(HandshakeError::TooManyOptions)
}

impl Haggle<'_> {
    /// Answers one decoded option.
    async fn option(
        &mut self,
        s: &mut NbdStream,
        opt: u32,
        option: ClientOption,
    ) -> Result<Step, HandshakeError> {
        match option {
            ClientOption::StartTls => self.start_tls(s).await?,
            ClientOption::Abort => {
                // The client may already be gone; that is its right after ABORT.
                let _ = reply(s, opt, NBD_REP_ACK, &[]).await;
                return Ok(Step::Abort);
            }
            ClientOption::StructuredReply => {
                self.structured = true;
                reply(s, opt, NBD_REP_ACK, &[]).await?;
            }
            ClientOption::List => {
                for v in self.reg.list() {
                    let name = v.config.name.as_bytes();
                    let mut d = Vec::with_capacity(4 + name.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name);
                    reply(s, opt, NBD_REP_SERVER, &d).await?;
                }
                reply(s, opt, NBD_REP_ACK, &[]).await?;
            }
            ClientOption::ListMetaContext(m) | ClientOption::SetMetaContext(m) => {
                self.meta_context(s, opt, m).await?
            }
            ClientOption::Lease(l) => self.lease(s, opt, l).await?,
            ClientOption::Info(go) | ClientOption::Go(go) => return self.go(s, opt, go).await,
            ClientOption::ExportName(name) => return self.export_name(s, &name).await,
            ClientOption::Unsupported(_) => {
                reply(s, opt, NBD_REP_ERR_UNSUP, b"option not supported").await?;
            }
        }
        Ok(Step::Next)
    }

    /// The volume `name` stands for (the empty name: the default export).
    fn export<'n>(&'n self, name: &'n str) -> &'n str {
        match (name, &self.cfg.default_export) {
            ("", Some(default)) => default,
            _ => name,
        }
    }

    async fn start_tls(&mut self, s: &mut NbdStream) -> Result<(), HandshakeError> {
        let opt = NBD_OPT_STARTTLS;
        let tls = match &self.cfg.tls {
            None => {
                let why = b"TLS is not configured on this server";
                return Ok(reply(s, opt, NBD_REP_ERR_POLICY, why).await?);
            }
            Some(_) if s.is_tls() => {
                return Ok(reply(s, opt, NBD_REP_ERR_INVALID, b"already in TLS").await?)
            }
            Some(tls) => tls,
        };
        reply(s, opt, NBD_REP_ACK, &[]).await?;
        s.accept_tls(&tls.acceptor)
            .await
            .map_err(HandshakeError::Tls)?;
        self.identity = s.peer_host_id()?;
        // The haggling starts afresh inside TLS.
        self.structured = false;
        self.lease = None;
        self.block_status_for = None;
        tracing::debug!(peer = %self.peer, host = ?self.identity, "TLS session established");
        Ok(())
    }

    async fn lease(
        &mut self,
        s: &mut NbdStream,
        opt: u32,
        l: LeaseOption,
    ) -> Result<(), HandshakeError> {
        if let Some(id) = self.identity.as_ref().filter(|id| **id != l.host) {
            tracing::warn!(target: "storaged::lease", peer = %self.peer, event = "refused",
                certificate = %id, claimed = %l.host,
                "lease option names another host than the client certificate");
            let why = format!(
                "the client certificate proves host {id}; the lease option names {}",
                l.host
            );
            return Ok(reply(s, opt, NBD_REP_ERR_POLICY, why.as_bytes()).await?);
        }
        self.lease = Some(l);
        Ok(reply(s, opt, NBD_REP_ACK, &[]).await?)
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: storaged serves
    /// `base:allocation` on every export.
    async fn meta_context(
        &mut self,
        s: &mut NbdStream,
        opt: u32,
        m: MetaContextOption,
    ) -> Result<(), HandshakeError> {
        let set = opt == NBD_OPT_SET_META_CONTEXT;
        if set {
            self.block_status_for = None;
        }
        if !self.structured {
            let why = b"negotiate structured replies first";
            return Ok(reply(s, opt, NBD_REP_ERR_INVALID, why).await?);
        }
        let export = self.export(&m.export).to_string();
        if let Err(e) = self.reg.get(&export) {
            return Ok(reply(s, opt, NBD_REP_ERR_UNKNOWN, e.to_string().as_bytes()).await?);
        }
        let matched = match m.queries.is_empty() {
            true => !set,
            false => m.queries.iter().any(|q| matches_base_allocation(opt, q)),
        };
        if matched {
            let item = encode_meta_context(BASE_ALLOCATION_ID, BASE_ALLOCATION);
            reply(s, opt, NBD_REP_META_CONTEXT, &item).await?;
            if set {
                self.block_status_for = Some(export);
            }
        }
        Ok(reply(s, opt, NBD_REP_ACK, &[]).await?)
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`: the export's info items; GO also attaches.
    async fn go(
        &mut self,
        s: &mut NbdStream,
        opt: u32,
        go: GoOption,
    ) -> Result<Step, HandshakeError> {
        let name = self.export(&go.name).to_string();
        let vol = match self.reg.find(&name).await {
            Ok(v) => v,
            Err(e) => {
                // Unknown, or (cluster mode) held by other nodes: "not master", with the master.
                reply(s, opt, refusal_code(&e), e.to_string().as_bytes()).await?;
                return Ok(Step::Next);
            }
        };
        let request = self.lease.as_ref().map(request_of);
        let att = if opt == NBD_OPT_GO {
            match self.attach(&vol, request).await {
                Ok(a) => Some(a),
                Err(e) => {
                    self.reg.metrics.refused_connection(refusal_reason(&e));
                    tracing::warn!(peer = %self.peer, volume = %name, error = %e,
                        "export refused at NBD_OPT_GO");
                    reply(s, opt, refusal_code(&e), e.to_string().as_bytes()).await?;
                    return Ok(Step::Next);
                }
            }
        } else if let Err(e) = self.reg.preview(&vol, request.as_ref()) {
            reply(s, opt, refusal_code(&e), e.to_string().as_bytes()).await?;
            return Ok(Step::Next);
        } else {
            None
        };
        // From here on a failed write drops `att`, which detaches the connection again.
        let read_only = self.lease.is_none() && anonymous_read_only(&vol);
        if read_only && att.is_some() {
            tracing::info!(peer = %self.peer, volume = %name, "{}", read_only_note(&vol));
        }
        let info = encode_info_export(vol.config.size, transmission_flags(read_only));
        reply(s, opt, NBD_REP_INFO, &info).await?;
        for item in &go.info {
            let data = match *item {
                NBD_INFO_BLOCK_SIZE => encode_info_block_size(1, 4096, MAX_REQUEST_LEN),
                NBD_INFO_NAME => encode_info_string(NBD_INFO_NAME, &vol.config.name),
                NBD_INFO_DESCRIPTION => match (&vol.config.description, read_only) {
                    (Some(d), false) => encode_info_string(NBD_INFO_DESCRIPTION, d),
                    (Some(d), true) => encode_info_string(
                        NBD_INFO_DESCRIPTION,
                        &format!("{d} ({})", read_only_note(&vol)),
                    ),
                    (None, true) => encode_info_string(NBD_INFO_DESCRIPTION, &read_only_note(&vol)),
                    (None, false) => continue,
                },
                _ => continue,
            };
            reply(s, opt, NBD_REP_INFO, &data).await?;
        }
        if let (Some(a), Some(state)) = (&att, att.as_ref().and_then(|a| a.state)) {
            let li = encode_info_lease(state, a.epoch);
            reply(s, opt, NBD_REP_INFO, &li).await?;
        }
        reply(s, opt, NBD_REP_ACK, &[]).await?;
        Ok(match att {
            Some(att) => Step::Transmission(self.negotiated(vol, att)),
            None => Step::Next,
        })
    }

    /// `NBD_OPT_EXPORT_NAME`: attach or disconnect (the protocol has no error reply for it).
    async fn export_name(&mut self, s: &mut NbdStream, name: &str) -> Result<Step, HandshakeError> {
        let refused = |e| HandshakeError::ExportRefused(name.to_string(), e);
        let vol = self.reg.find(self.export(name)).await.map_err(refused)?;
        let request = self.lease.as_ref().map(request_of);
        let att = self.attach(&vol, request).await.map_err(refused)?;
        let read_only = self.lease.is_none() && anonymous_read_only(&vol);
        let mut d = Vec::with_capacity(134);
        d.extend_from_slice(&vol.config.size.to_be_bytes());
        d.extend_from_slice(&transmission_flags(read_only).to_be_bytes());
        if !self.no_zeroes {
            d.extend_from_slice(&[0u8; 124]);
        }
        s.write_all(&d).await?;
        s.flush().await?;
        // EXPORT_NAME has no structured-reply negotiation of its own; keep what was set.
        Ok(Step::Transmission(self.negotiated(vol, att)))
    }

    /// Attaches the connection unless the volume has its fill of connections.
    async fn attach(
        &self,
        vol: &Arc<Volume>,
        request: Option<LeaseRequest>,
    ) -> Result<Attachment, RegistryError> {
        let max = self.cfg.limits.max_connections_per_volume;
        self.reg.attach_at_most(vol, request, self.peer, max).await
    }

    fn negotiated(&self, vol: Arc<Volume>, att: Attachment) -> Negotiated {
        let block_status =
            self.structured && self.block_status_for.as_deref() == Some(&vol.config.name);
        Negotiated {
            vol,
            att,
            structured: self.structured,
            block_status,
        }
    }
}

fn request_of(l: &LeaseOption) -> LeaseRequest {
    LeaseRequest {
        holder: Holder {
            host: l.host.clone(),
            instance: l.instance.clone(),
        },
        state: l.state,
        expected_epoch: l.expected_epoch,
    }
}
