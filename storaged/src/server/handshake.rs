//! Server side of the fixed newstyle handshake, including `NBD_OPT_STARTTLS` and the lease
//! option.
//!
//! Over TLS the connection's identity is the host id of the client's certificate, and a
//! lease option naming another host is refused: a client cannot claim to be a host it holds no
//! certificate for. In plaintext (no TLS configured, or a loopback client where that is
//! allowed) the lease option is taken at its word.

use crate::lease::{LeaseError, LeaseRequest};
use crate::registry::{Attachment, Registry, RegistryError};
use crate::server::NbdTls;
use crate::volume::Volume;
use std::net::SocketAddr;
use std::sync::Arc;
use storaged_client::api::{AnonymousPolicy, Holder};
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
}

fn transmission_flags(read_only: bool) -> u16 {
    let base = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_CAN_MULTI_CONN;
    if read_only {
        base | NBD_FLAG_READ_ONLY
    } else {
        base | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES
    }
}

fn anonymous_read_only(vol: &Volume) -> bool {
    vol.access().anonymous != AnonymousPolicy::ReadWriteWithoutPrimary
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

/// Runs the handshake on `stream`. `Ok(None)`: the client aborted cleanly; otherwise the
/// connection (upgraded to TLS if the client asked) and what was negotiated.
pub async fn handshake(
    stream: NbdStream,
    reg: &Registry,
    peer: SocketAddr,
    tls: Option<&NbdTls>,
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
    let no_zeroes = cflags & NBD_FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut lease: Option<LeaseOption> = None;
    let tls_required = tls.is_some_and(|t| t.required_for(peer));
    // The host id the client's certificate proves, once in TLS.
    let mut identity: Option<String> = None;

    for _ in 0..MAX_OPTIONS {
        let mut hb = [0u8; 16];
        s.read_exact(&mut hb).await?;
        let h = OptionHeader::decode(&hb)?;
        if h.length > MAX_OPTION_LEN {
            return Err(HandshakeError::OptionTooBig {
                option: h.option,
                length: h.length,
            });
        }
        let mut data = vec![0u8; h.length as usize];
        s.read_exact(&mut data).await?;
        let opt = h.option;
        if shutting_down() && opt != NBD_OPT_ABORT {
            reply(s, opt, NBD_REP_ERR_SHUTDOWN, b"server shutting down").await?;
            continue;
        }
        if tls_required && !s.is_tls() && opt != NBD_OPT_STARTTLS && opt != NBD_OPT_ABORT {
            if opt == NBD_OPT_EXPORT_NAME {
                let name = String::from_utf8_lossy(&data).into_owned();
                return Err(HandshakeError::TlsRequired(name));
            }
            reply(s, opt, NBD_REP_ERR_TLS_REQD, TLS_REQUIRED).await?;
            continue;
        }
        match opt {
            NBD_OPT_STARTTLS => {
                let refusal: Option<(u32, &[u8])> = match tls {
                    _ if !data.is_empty() => Some((NBD_REP_ERR_INVALID, b"no data expected")),
                    None => Some((NBD_REP_ERR_POLICY, b"TLS is not configured on this server")),
                    Some(_) if s.is_tls() => Some((NBD_REP_ERR_INVALID, b"already in TLS")),
                    Some(_) => None,
                };
                if let Some((code, why)) = refusal {
                    reply(s, opt, code, why).await?;
                    continue;
                }
                reply(s, opt, NBD_REP_ACK, &[]).await?;
                let Some(tls) = tls else { continue };
                s.accept_tls(&tls.acceptor)
                    .await
                    .map_err(HandshakeError::Tls)?;
                identity = s.peer_host_id()?;
                // The haggling starts afresh inside TLS.
                structured = false;
                lease = None;
                tracing::debug!(%peer, host = ?identity, "TLS session established");
            }
            NBD_OPT_ABORT => {
                // The client may already be gone; that is its right after ABORT.
                let _ = reply(s, opt, NBD_REP_ACK, &[]).await;
                return Ok(None);
            }
            NBD_OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    structured = true;
                    reply(s, opt, NBD_REP_ACK, &[]).await?;
                } else {
                    reply(s, opt, NBD_REP_ERR_INVALID, b"no data expected").await?;
                }
            }
            NBD_OPT_LIST => {
                if !data.is_empty() {
                    reply(s, opt, NBD_REP_ERR_INVALID, b"no data expected").await?;
                    continue;
                }
                for v in reg.list() {
                    let name = v.config.name.as_bytes();
                    let mut d = Vec::with_capacity(4 + name.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name);
                    reply(s, opt, NBD_REP_SERVER, &d).await?;
                }
                reply(s, opt, NBD_REP_ACK, &[]).await?;
            }
            NBD_OPT_LEASE => match LeaseOption::decode(&data) {
                Ok(l) if identity.as_ref().is_some_and(|id| *id != l.host) => {
                    let id = identity.as_deref().unwrap_or_default();
                    tracing::warn!(target: "storaged::lease", %peer, event = "refused",
                        certificate = %id, claimed = %l.host,
                        "lease option names another host than the client certificate");
                    let why = format!(
                        "the client certificate proves host {id}; the lease option names {}",
                        l.host
                    );
                    reply(s, opt, NBD_REP_ERR_POLICY, why.as_bytes()).await?;
                }
                Ok(l) => {
                    lease = Some(l);
                    reply(s, opt, NBD_REP_ACK, &[]).await?;
                }
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "malformed lease option");
                    reply(s, opt, NBD_REP_ERR_INVALID, e.to_string().as_bytes()).await?;
                }
            },
            NBD_OPT_INFO | NBD_OPT_GO => {
                let go = match GoOption::decode(&data) {
                    Ok(g) => g,
                    Err(e) => {
                        reply(s, opt, NBD_REP_ERR_INVALID, e.to_string().as_bytes()).await?;
                        continue;
                    }
                };
                let vol = match reg.get(&go.name) {
                    Ok(v) => v,
                    Err(e) => {
                        reply(s, opt, NBD_REP_ERR_UNKNOWN, e.to_string().as_bytes()).await?;
                        continue;
                    }
                };
                let att = if opt == NBD_OPT_GO {
                    match reg.attach(&vol, lease.as_ref().map(request_of), peer).await {
                        Ok(a) => Some(a),
                        Err(e) => {
                            tracing::warn!(%peer, volume = %go.name, error = %e,
                                "export refused at NBD_OPT_GO");
                            reply(s, opt, refusal_code(&e), e.to_string().as_bytes()).await?;
                            continue;
                        }
                    }
                } else if let Err(e) = reg.preview(&vol, lease.as_ref().map(request_of).as_ref()) {
                    reply(s, opt, refusal_code(&e), e.to_string().as_bytes()).await?;
                    continue;
                } else {
                    None
                };
                let read_only = lease.is_none() && anonymous_read_only(&vol);
                let size = vol.config.size;
                let info = encode_info_export(size, transmission_flags(read_only));
                reply(s, opt, NBD_REP_INFO, &info).await?;
                if go.info.contains(&NBD_INFO_BLOCK_SIZE) {
                    let bs = encode_info_block_size(1, 4096, MAX_REQUEST_LEN);
                    reply(s, opt, NBD_REP_INFO, &bs).await?;
                }
                if let (Some(a), Some(state)) = (&att, att.as_ref().and_then(|a| a.state)) {
                    let li = encode_info_lease(state, a.epoch);
                    reply(s, opt, NBD_REP_INFO, &li).await?;
                }
                reply(s, opt, NBD_REP_ACK, &[]).await?;
                if let Some(att) = att {
                    let neg = Negotiated {
                        vol,
                        att,
                        structured,
                    };
                    return Ok(Some((stream, neg)));
                }
            }
            NBD_OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let vol = reg
                    .get(&name)
                    .map_err(|e| HandshakeError::ExportRefused(name.clone(), e))?;
                let att = reg
                    .attach(&vol, lease.as_ref().map(request_of), peer)
                    .await
                    .map_err(|e| HandshakeError::ExportRefused(name.clone(), e))?;
                let read_only = lease.is_none() && anonymous_read_only(&vol);
                let mut d = Vec::with_capacity(134);
                d.extend_from_slice(&vol.config.size.to_be_bytes());
                d.extend_from_slice(&transmission_flags(read_only).to_be_bytes());
                if !no_zeroes {
                    d.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&d).await?;
                s.flush().await?;
                // EXPORT_NAME has no structured-reply negotiation of its own; keep what was set.
                let neg = Negotiated {
                    vol,
                    att,
                    structured,
                };
                return Ok(Some((stream, neg)));
            }
            _ => {
                reply(s, opt, NBD_REP_ERR_UNSUP, b"option not supported").await?;
            }
        }
    }
    Err(HandshakeError::TooManyOptions)
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
