//! Client side of the handshake and the connection logic across storage addresses.

use super::{ClientConfig, ClientError, Negotiated};
use crate::protocol::*;
use crate::stream::NbdStream;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn send_option(s: &mut NbdStream, option: u32, data: &[u8]) -> Result<(), ClientError> {
    let h = OptionHeader {
        option,
        length: data.len() as u32,
    };
    s.write_all(&h.encode()).await?;
    s.write_all(data).await?;
    s.flush().await?;
    Ok(())
}

/// Reads one option reply: header and data (bounded).
async fn read_reply(s: &mut NbdStream) -> Result<(OptionReplyHeader, Vec<u8>), ClientError> {
    let mut hb = [0u8; OPTION_REPLY_LEN];
    s.read_exact(&mut hb).await?;
    let h = OptionReplyHeader::decode(&hb)?;
    if h.length > MAX_OPTION_LEN * 16 {
        return Err(ProtocolError::Invalid("option reply too long").into());
    }
    let mut data = vec![0u8; h.length as usize];
    s.read_exact(&mut data).await?;
    Ok((h, data))
}

fn refusal(code: u32, data: &[u8]) -> ClientError {
    let message = String::from_utf8_lossy(data).into_owned();
    match code {
        NBD_REP_ERR_LEASE_DEACTIVATED => ClientError::Deactivated { message },
        NBD_REP_ERR_LEASE_ALREADY_PRIMARY => ClientError::AlreadyPrimary { message },
        NBD_REP_ERR_LEASE_CONFLICT => ClientError::Conflict { message },
        NBD_REP_ERR_LEASE_EPOCH => ClientError::EpochMismatch { message },
        _ => ClientError::Refused { code, message },
    }
}

/// One handshake on one address with the given requested state.
pub(super) async fn handshake(
    addr: &str,
    cfg: &ClientConfig,
    state: Option<RequestedState>,
) -> Result<(NbdStream, Negotiated), ClientError> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut s = NbdStream::Plain(tcp);
    let magic = s.read_u64().await?;
    let opt = s.read_u64().await?;
    if magic != NBDMAGIC || opt != IHAVEOPT {
        return Err(ProtocolError::BadMagic {
            found: magic,
            expected: NBDMAGIC,
        }
        .into());
    }
    let hflags = s.read_u16().await?;
    if hflags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtocolError::Invalid("server lacks fixed newstyle").into());
    }
    let mut cflags = NBD_FLAG_C_FIXED_NEWSTYLE;
    if hflags & NBD_FLAG_NO_ZEROES != 0 {
        cflags |= NBD_FLAG_C_NO_ZEROES;
    }
    s.write_u32(cflags).await?;

    if let Some(tls) = &cfg.tls {
        send_option(&mut s, NBD_OPT_STARTTLS, &[]).await?;
        let (h, data) = read_reply(&mut s).await?;
        if h.option != NBD_OPT_STARTTLS || h.reply != NBD_REP_ACK {
            return Err(refusal(h.reply, &data));
        }
        let name = tls.server_name(addr);
        let server = vmhop_common::tls::server_name(&name).map_err(ClientError::Tls)?;
        s.connect_tls(&tls.connector, server)
            .await
            .map_err(ClientError::TlsHandshake)?;
    }

    if let (Some(lease), Some(state)) = (&cfg.lease, state) {
        let opt = LeaseOption {
            host: lease.host.clone(),
            instance: lease.instance.clone(),
            state,
            expected_epoch: lease.expected_epoch,
        };
        send_option(&mut s, NBD_OPT_LEASE, &opt.encode()).await?;
        let (h, data) = read_reply(&mut s).await?;
        if h.option != NBD_OPT_LEASE || h.reply != NBD_REP_ACK {
            return Err(refusal(h.reply, &data));
        }
    }
    let go = GoOption {
        name: cfg.export.clone(),
        info: vec![NBD_INFO_BLOCK_SIZE],
    };
    send_option(&mut s, NBD_OPT_GO, &go.encode()).await?;
    let mut neg = Negotiated {
        size: 0,
        flags: 0,
        max_request: MAX_REQUEST_LEN,
        lease: None,
    };
    let mut have_export = false;
    loop {
        let (h, data) = read_reply(&mut s).await?;
        if h.option != NBD_OPT_GO {
            return Err(ProtocolError::Invalid("reply to another option").into());
        }
        if h.is_error() {
            return Err(refusal(h.reply, &data));
        }
        match h.reply {
            NBD_REP_ACK => break,
            NBD_REP_INFO => match InfoItem::decode(&data)? {
                InfoItem::Export { size, flags } => {
                    neg.size = size;
                    neg.flags = flags;
                    have_export = true;
                }
                InfoItem::BlockSize { max, .. } => neg.max_request = max.min(MAX_REQUEST_LEN),
                InfoItem::Lease { state, epoch } => neg.lease = Some((state, epoch)),
                InfoItem::Name(_) | InfoItem::Description(_) | InfoItem::Other(_) => {}
            },
            _ => return Err(ProtocolError::Invalid("unexpected reply to GO").into()),
        }
    }
    if !have_export {
        return Err(ProtocolError::Invalid("GO without NBD_INFO_EXPORT").into());
    }
    Ok((s, neg))
}

/// Whether an error is an answer from a server (stop) rather than the absence of one (go on).
fn is_answer(e: &ClientError) -> bool {
    !matches!(
        e,
        ClientError::Io(_)
            | ClientError::Protocol(_)
            | ClientError::Refused {
                code: NBD_REP_ERR_NOT_MASTER,
                ..
            }
    )
}

/// The connection logic: each address in turn, "already primary" retried as primary,
/// "deactivated" and other refusals returned at once, no answer tried on the next address,
/// "not master" tried on the master it names (once per round, even if it is not in the
/// list), then on the next address; rounds separated by exponential backoff.
pub(super) async fn connect_any(
    cfg: &ClientConfig,
) -> Result<(NbdStream, Negotiated), ClientError> {
    let mut backoff = cfg.backoff_initial;
    let mut last = String::from("no address given");
    let mut attempts = 0u32;
    for round in 0..cfg.rounds.max(1) {
        if round > 0 {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(cfg.backoff_max);
        }
        let mut queue: std::collections::VecDeque<String> = cfg.addresses.iter().cloned().collect();
        let mut tried: Vec<String> = Vec::new();
        while let Some(addr) = queue.pop_front() {
            let addr = addr.as_str();
            if tried.iter().any(|t| t == addr) {
                continue;
            }
            tried.push(addr.to_string());
            let mut state = cfg.lease.as_ref().map(|l| l.state);
            loop {
                attempts += 1;
                let r =
                    tokio::time::timeout(cfg.connect_timeout, handshake(addr, cfg, state)).await;
                let e = match r {
                    Ok(Ok(ok)) => return Ok(ok),
                    Ok(Err(e)) => e,
                    Err(_) => ClientError::Io(std::io::ErrorKind::TimedOut.into()),
                };
                if let (ClientError::AlreadyPrimary { .. }, Some(RequestedState::Standby)) =
                    (&e, state)
                {
                    tracing::info!(addr, "already primary: retrying as primary");
                    state = Some(RequestedState::Primary);
                    continue;
                }
                if is_answer(&e) {
                    return Err(e);
                }
                if let ClientError::Refused {
                    code: NBD_REP_ERR_NOT_MASTER,
                    message,
                } = &e
                {
                    if let Some(master) = master_hint(message) {
                        tracing::debug!(addr, master, "not the master: trying the master");
                        queue.push_front(master.to_string());
                    }
                }
                tracing::debug!(addr, error = %e, "no answer; trying the next address");
                last = format!("{addr}: {e}");
                break;
            }
        }
    }
    Err(ClientError::Unreachable { attempts, last })
}

/// Default connect timeout per attempt.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
