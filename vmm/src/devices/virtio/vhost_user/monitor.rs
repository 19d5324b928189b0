//! Watching a vhost-user backend: one thread per device notices the backend hanging up (its
//! own handle on the socket reports POLLRDHUP), says so in the log at once, and from then on
//! tries to connect again. A backend listening on the socket again is checked (it must offer
//! the disk the guest saw: same size, every feature the guest uses) and given the data path
//! anew, each ring's base at its used index (see [`super`] for why that is exact).

use super::device::{Conn, Shared};
use super::frontend::{used_index, Session};
use super::VhostUserError;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmhop_common::error::chain as error_chain;

/// How long one poll of the socket waits (and so how soon a stopped device's thread ends).
const POLL: Duration = Duration::from_millis(200);
/// Pause between two attempts to reconnect.
const RETRY: Duration = Duration::from_millis(250);

/// Starts the monitor of `shared`'s backend, connected on `watch`.
pub(super) fn spawn(shared: Arc<Shared>, watch: UnixStream) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("vhost-user-mon".into())
        .spawn(move || run(&shared, Some(watch)))?;
    Ok(())
}

fn run(shared: &Shared, mut watch: Option<UnixStream>) {
    let mut down_since: Option<Instant> = None;
    let mut attempts = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        match &watch {
            Some(w) => {
                if hung_up(w) {
                    watch = None;
                    down_since = Some(Instant::now());
                    attempts = 0;
                    lost(shared);
                }
            }
            None => {
                std::thread::sleep(RETRY);
                attempts += 1;
                match reconnect(shared) {
                    Ok(w) => {
                        let down_ms = down_since.map_or(0, |t| t.elapsed().as_millis() as u64);
                        tracing::info!(socket = %shared.socket.display(), down_ms, attempts,
                            "vhost-user backend reconnected: the disk's I/O resumes");
                        watch = Some(w);
                    }
                    Err(e) => {
                        // Say it once, then every minute or so, not every attempt.
                        if attempts == 1 || attempts.is_multiple_of(240) {
                            tracing::warn!(socket = %shared.socket.display(), attempts,
                                error = %error_chain(&e),
                                "vhost-user backend still gone; the disk's I/O waits");
                        }
                    }
                }
            }
        }
    }
}

/// Whether the backend closed its end (waits up to [`POLL`]). Asks for POLLRDHUP alone: the
/// socket may be readable with a reply meanwhile. (libc's poll: nix drops the revents bits it
/// has no name for, POLLRDHUP among them.)
fn hung_up(w: &UnixStream) -> bool {
    let mut fd = libc::pollfd {
        fd: w.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; `w` keeps the descriptor open.
    let n = unsafe { libc::poll(&mut fd, 1, POLL.as_millis() as libc::c_int) };
    match n {
        0 => false,
        n if n < 0 => std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted,
        _ => fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0,
    }
}

fn lost(shared: &Shared) {
    let mut conn = shared.conn();
    conn.session = None;
    let rings = conn.running.as_ref().map(|r| {
        r.queues
            .iter()
            .map(|(q, _)| used_index(&r.mem, q.used_ring).unwrap_or(0))
            .collect::<Vec<_>>()
    });
    tracing::error!(socket = %shared.socket.display(), used_indices = ?rings,
        "vhost-user backend disconnected: the disk's I/O stalls until a backend listens on \
         the socket again (requests in flight then run again)");
}

/// One attempt: connect, check the offer, start the data path where it stands.
fn reconnect(shared: &Shared) -> Result<UnixStream, VhostUserError> {
    let (mut session, watch) = Session::connect(&shared.socket, Duration::ZERO)?;
    check_offer(shared, &mut session)?;
    let mut conn = shared.conn();
    resume_at_used(&mut conn);
    conn.session = Some(session);
    if let Err(e) = shared.start(&mut conn) {
        conn.session = None;
        return Err(e);
    }
    Ok(watch)
}

/// A backend that offers another disk than the guest saw is not attached.
fn check_offer(shared: &Shared, session: &mut Session) -> Result<(), VhostUserError> {
    let config = session.config(8)?;
    let capacity = u64::from_le_bytes(config[..8].try_into().unwrap_or([0; 8]));
    let needed = shared.features & !(1 << virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_F_RO);
    if capacity.saturating_mul(vmm_disk::SECTOR_SIZE) != shared.size
        || session.backend_features & needed != needed
    {
        return Err(VhostUserError::Lacks(
            "the offer the guest negotiated against",
        ));
    }
    Ok(())
}

/// Sets each ring's base to its used index: the first request not returned to the driver.
fn resume_at_used(conn: &mut Conn) {
    if let Some(r) = conn.running.as_mut() {
        for (q, _) in r.queues.iter_mut() {
            if let Some(used) = used_index(&r.mem, q.used_ring) {
                q.next_avail = used;
                q.next_used = used;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_peer_is_seen() {
        let (a, b) = UnixStream::pair().unwrap();
        assert!(!hung_up(&a));
        drop(b);
        assert!(hung_up(&a));
    }
}
