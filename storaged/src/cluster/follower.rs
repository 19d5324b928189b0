//! The slave's side of replication: the listener masters connect to. Each stream is checked
//! against etcd (its term must be the volume's elected term and at least any term seen here)
//! and its ops are applied in the order they arrive, each acknowledged once applied.

use super::replica::Op;
use super::role::Role;
use super::wire::{self, Ack, Hello, HelloReply, OpHeader, Status, WireError};
use super::{election_name, placement, Cluster};
use bytes::BytesMut;
use etcd_client::{GetOptions, SortOrder, SortTarget};
use std::sync::Arc;
use storaged_client::stream::NbdStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Accepts masters' streams for as long as the process runs.
pub async fn serve(listener: TcpListener, cluster: Arc<Cluster>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "replication listener: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let c = cluster.clone();
        tokio::spawn(async move {
            if let Err(e) = stream_task(stream, &c).await {
                tracing::info!(%peer, error = %e, "replication stream ended");
            }
        });
    }
}

/// The create revision of the volume's current leader key (0 when none) and the node it names.
pub(crate) async fn elected(
    cluster: &Cluster,
    volume: &str,
) -> Result<(i64, String), etcd_client::Error> {
    let opts = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
        .with_limit(1);
    let prefix = format!("{}/", election_name(volume));
    let resp = super::get(&cluster.etcd(), prefix, Some(opts)).await?;
    Ok(resp.kvs().first().map_or((0, String::new()), |kv| {
        let node = String::from_utf8_lossy(kv.value()).into_owned();
        (kv.create_revision(), node)
    }))
}

/// The highest term seen for `volume` after `term` is presented; whether `term` is current.
fn observe(cluster: &Cluster, volume: &str, term: i64) -> (i64, bool) {
    let mut seen = cluster.seen_terms.lock().expect("terms lock");
    let t = seen.entry(volume.to_string()).or_insert(0);
    if term >= *t {
        *t = term;
    }
    (*t, term == *t)
}

/// Sends the answer to a hello, flushed: over TLS it could otherwise wait in the TLS layer.
async fn send_reply(s: &mut NbdStream, r: HelloReply) -> Result<(), WireError> {
    s.write_all(&r.encode()).await?;
    Ok(s.flush().await?)
}

async fn stream_task(tcp: TcpStream, cluster: &Arc<Cluster>) -> Result<(), WireError> {
    tcp.set_nodelay(true)?;
    let mut s = NbdStream::Plain(tcp);
    // With TLS, the master proves its node id with its host certificate before anything else.
    let proven = match &cluster.tls {
        None => None,
        Some(tls) => {
            let handshake = s.accept_tls(&tls.acceptor);
            tokio::time::timeout(cluster.config.replication_timeout, handshake)
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            let id = s
                .peer_host_id()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            Some(id.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::PermissionDenied))?)
        }
    };
    let hello = tokio::time::timeout(cluster.config.replication_timeout, Hello::read(&mut s))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let term = hello.term as i64;
    let refuse = |status, seen: i64| HelloReply {
        status,
        term: seen.max(0) as u64,
    };
    if hello.version != wire::VERSION {
        send_reply(&mut s, refuse(Status::BadVersion, 0)).await?;
        return Ok(());
    }
    let Ok(vol) = placement::ensure_local(cluster, &hello.volume).await else {
        send_reply(&mut s, refuse(Status::UnknownVolume, 0)).await?;
        return Ok(());
    };
    if proven.as_ref().is_some_and(|id| *id != hello.from) {
        tracing::warn!(target: "storaged::cluster", volume = %hello.volume,
            claimed = %hello.from, certificate = ?proven,
            "replication stream refused: the certificate names another node");
        send_reply(&mut s, refuse(Status::Forbidden, 0)).await?;
        return Ok(());
    }
    match elected(cluster, &hello.volume).await {
        Ok((t, node)) if t == term && node == hello.from => {}
        Ok((t, node)) if t == term => {
            tracing::warn!(target: "storaged::cluster", volume = %hello.volume,
                claimed = %hello.from, master = %node,
                "replication stream refused: the sender is not the elected master");
            send_reply(&mut s, refuse(Status::Forbidden, t)).await?;
            return Ok(());
        }
        Ok((t, _)) => {
            tracing::warn!(target: "storaged::cluster", volume = %hello.volume,
                master = %hello.from, term, elected = t, "replication from a stale term refused");
            send_reply(&mut s, refuse(Status::StaleTerm, t)).await?;
            return Ok(());
        }
        Err(_) => {
            send_reply(&mut s, refuse(Status::Unavailable, 0)).await?;
            return Ok(());
        }
    }
    let (seen, current) = observe(cluster, &hello.volume, term);
    if !current {
        send_reply(&mut s, refuse(Status::StaleTerm, seen)).await?;
        return Ok(());
    }
    // A newer master exists: if this node thought it was master, it is not.
    if let Role::Master(r) = vol.role.get() {
        if r.term < term {
            r.fence();
        }
    }
    // This stream replaces any earlier one of the volume: once the earlier one's op in
    // progress (if any) is done, it applies nothing more, so that ops it still had buffered
    // cannot land after this stream's (a resync's copy would be overwritten with older data).
    let applier = cluster.applier(&hello.volume);
    let generation = {
        let mut current = applier.lock().await;
        *current += 1;
        *current
    };
    tracing::info!(target: "storaged::cluster", event = "slave", volume = %hello.volume,
        master = %hello.from, term, "replication stream accepted");
    send_reply(&mut s, refuse(Status::Ok, term)).await?;
    let (mut rd, mut wr) = s.into_halves();
    let mut hb = [0u8; wire::OP_LEN];
    loop {
        rd.read_exact(&mut hb).await?;
        let h = OpHeader::decode(&hb)?;
        let mut data = BytesMut::zeroed(h.data_len());
        rd.read_exact(&mut data).await?;
        let (seen, current) = observe(cluster, &hello.volume, term);
        let status = if !current {
            Status::StaleTerm
        } else if h
            .offset
            .checked_add(h.length as u64)
            .is_none_or(|e| e > vol.config.size)
        {
            Status::Io
        } else {
            let current = applier.lock().await;
            if *current != generation {
                tracing::info!(target: "storaged::cluster", volume = %hello.volume, term,
                    "replication stream replaced by a newer one");
                return Ok(());
            }
            let op = Op::from_wire(&h, data.freeze());
            let file = vol.file.clone();
            let done = tokio::task::spawn_blocking(move || op.apply(&file)).await;
            drop(current);
            match done {
                Ok(Ok(())) => Status::Ok,
                Ok(Err(e)) => {
                    tracing::warn!(volume = %hello.volume, error = %e, "replicated op failed");
                    Status::Io
                }
                Err(_) => Status::Io,
            }
        };
        let ack = Ack {
            seq: h.seq,
            status,
            term: seen.max(0) as u64,
        };
        // Flushed, or over TLS the ack could wait in the TLS layer for the next one.
        wr.write_all(&ack.encode()).await?;
        wr.flush().await?;
        if status == Status::StaleTerm {
            return Ok(());
        }
    }
}
