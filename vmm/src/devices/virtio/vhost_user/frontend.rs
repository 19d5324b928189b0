//! One connection to a vhost-user backend, and the messages the VMM sends on it (QEMU's
//! `docs/interop/vhost-user.rst`; the `vhost` crate encodes them):
//!
//! ```text
//! connect: SET_OWNER, GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (CONFIG
//!          required; MQ, LOG_SHMFD, REPLY_ACK when offered), GET_QUEUE_NUM, GET_CONFIG
//! start:   SET_FEATURES (the guest's | PROTOCOL_FEATURES [| LOG_ALL]), SET_MEM_TABLE (the
//!          guest memory's memfd regions) [, SET_LOG_BASE], then per queue SET_VRING_NUM,
//!          SET_VRING_ADDR, SET_VRING_BASE, SET_VRING_CALL (the irqfd), SET_VRING_KICK (the
//!          ioeventfd), SET_VRING_ENABLE
//! stop:    GET_VRING_BASE per queue (the backend completes what is in flight first)
//! logging: SET_LOG_BASE (the dirty log's memfd), SET_FEATURES with or without LOG_ALL
//! ```
//! Every operation has a deadline ([`REPLY_TIMEOUT`]): the `vhost` crate retries a read that
//! timed out forever, so a backend that stops answering (or answers with a shorter message
//! than the crate expects) would hang the calling thread, and with it the VM's control loop.
//! Past the deadline the VMM shuts the socket down: the operation fails, the monitor sees the
//! backend gone and reconnects.

use super::log::DirtyLog;
use super::VhostUserError;
use crate::memory::GuestMem;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use std::io::{IoSlice, Read};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueState;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_api::config::MAX_DISK_QUEUES;
use vmm_sys_util::eventfd::EventFd;

/// How long one reply may take.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the VMM waits for a backend's socket to accept when the VM is built.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// SET_LOG_BASE's request code.
const REQ_SET_LOG_BASE: u32 = FrontendReq::SET_LOG_BASE as u32;
/// Header flags: protocol version 1.
const HDR_VERSION_1: u32 = 0x1;
/// Header flags: a reply.
const HDR_REPLY: u32 = 0x4;
/// A message header: request, flags, body size (u32 each).
const HDR_LEN: usize = 12;
/// SET_LOG_BASE with its body (mmap size and offset, u64 each).
const LOG_MSG_LEN: usize = HDR_LEN + 16;
/// The largest reply body accepted for SET_LOG_BASE.
const MAX_REPLY_BODY: usize = 256;
/// Protocol features the VMM uses when the backend offers them (CONFIG is required).
const WANTED_PROTOCOL: VhostUserProtocolFeatures = VhostUserProtocolFeatures::CONFIG
    .union(VhostUserProtocolFeatures::MQ)
    .union(VhostUserProtocolFeatures::LOG_SHMFD)
    .union(VhostUserProtocolFeatures::REPLY_ACK);

/// A queue as the guest's driver set it up, with its kick eventfd.
pub struct RingSetup<'a> {
    /// Layout and position.
    pub state: QueueState,
    /// The queue's ioeventfd.
    pub kick: &'a EventFd,
}

/// Shuts the connection down if the operation it guards is not done within [`REPLY_TIMEOUT`].
struct Deadline {
    done: Option<mpsc::Sender<()>>,
}

impl Deadline {
    fn arm(socket: &UnixStream, operation: &'static str) -> Deadline {
        let (done, wait) = mpsc::channel::<()>();
        if let Ok(socket) = socket.try_clone() {
            let spawned = std::thread::Builder::new()
                .name("vhost-user-deadline".into())
                .spawn(move || {
                    if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(REPLY_TIMEOUT) {
                        tracing::error!(operation, timeout = ?REPLY_TIMEOUT,
                            "vhost-user backend did not answer in time; disconnecting it");
                        let _ = socket.shutdown(Shutdown::Both);
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, operation, "no deadline for a vhost-user operation");
            }
        }
        Deadline { done: Some(done) }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
    }
}

/// A connected, negotiated backend.
pub struct Session {
    fe: Frontend,
    /// The socket, for the deadlines.
    socket: UnixStream,
    /// Virtio feature bits the backend offers.
    pub backend_features: u64,
    /// Protocol features in use.
    pub protocol: VhostUserProtocolFeatures,
    /// Queues the backend serves at most.
    pub queue_num: u64,
}

impl Session {
    /// Connects to `socket` (retrying while it does not accept yet, up to `wait`) and
    /// negotiates. Returns the session and a second handle on the socket, to watch for the
    /// backend hanging up.
    pub fn connect(socket: &Path, wait: Duration) -> Result<(Session, UnixStream), VhostUserError> {
        let deadline = Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline && retryable(&e) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(VhostUserError::Connect(e)),
            }
        };
        let socket_err = VhostUserError::Socket;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(socket_err)?;
        stream
            .set_write_timeout(Some(REPLY_TIMEOUT))
            .map_err(socket_err)?;
        let watch = stream.try_clone().map_err(socket_err)?;
        let socket = stream.try_clone().map_err(socket_err)?;
        let _deadline = Deadline::arm(&socket, "negotiate");
        let mut fe = Frontend::from_stream(stream, u64::from(MAX_DISK_QUEUES));
        let call = |what: &'static str| move |e| VhostUserError::Message(what, e);
        fe.set_owner().map_err(call("SET_OWNER"))?;
        let backend_features = fe.get_features().map_err(call("GET_FEATURES"))?;
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(VhostUserError::Lacks("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        let offered = fe
            .get_protocol_features()
            .map_err(call("GET_PROTOCOL_FEATURES"))?;
        if !offered.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostUserError::Lacks("VHOST_USER_PROTOCOL_F_CONFIG"));
        }
        let protocol = offered & WANTED_PROTOCOL;
        fe.set_protocol_features(protocol)
            .map_err(call("SET_PROTOCOL_FEATURES"))?;
        let queue_num = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            fe.get_queue_num().map_err(call("GET_QUEUE_NUM"))?
        } else {
            1
        };
        let session = Session {
            fe,
            socket,
            backend_features,
            protocol,
            queue_num,
        };
        Ok((session, watch))
    }

    /// `len` bytes of the device's configuration space.
    pub fn config(&mut self, len: u32) -> Result<Vec<u8>, VhostUserError> {
        let _deadline = Deadline::arm(&self.socket, "GET_CONFIG");
        let (_, data) = self
            .fe
            .get_config(
                0,
                len,
                VhostUserConfigFlags::WRITABLE,
                &vec![0u8; len as usize],
            )
            .map_err(|e| VhostUserError::Message("GET_CONFIG", e))?;
        Ok(data)
    }

    /// Whether the backend can log its writes into guest memory.
    pub fn can_log(&self) -> bool {
        self.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD)
            && self.backend_features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0
    }

    fn set_features(&self, guest: u64, logging: bool) -> Result<(), VhostUserError> {
        let mut f =
            (guest & self.backend_features) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if logging {
            f |= VhostUserVirtioFeatures::LOG_ALL.bits();
        }
        self.fe
            .set_features(f)
            .map_err(|e| VhostUserError::Message("SET_FEATURES", e))
    }

    /// Starts the backend's data path on `rings` over `mem`, with the features the guest
    /// acknowledged, the dirty log when `log` is given, and `call` signalled on completions.
    pub fn start(
        &mut self,
        mem: &GuestMem,
        rings: &[RingSetup<'_>],
        guest_features: u64,
        call: &EventFd,
        log: Option<&DirtyLog>,
    ) -> Result<(), VhostUserError> {
        let msg = |what: &'static str| move |e| VhostUserError::Message(what, e);
        let _deadline = Deadline::arm(&self.socket, "start the rings");
        self.set_features(guest_features, log.is_some())?;
        let mut regions = Vec::new();
        for r in mem.iter() {
            regions.push(
                VhostUserMemoryRegionInfo::from_guest_region(r).map_err(msg("SET_MEM_TABLE"))?,
            );
        }
        self.fe
            .set_mem_table(&regions)
            .map_err(msg("SET_MEM_TABLE"))?;
        if let Some(log) = log {
            self.set_log(log)?;
        }
        for (i, ring) in rings.iter().enumerate() {
            let q = &ring.state;
            let hva = |gpa: u64| {
                mem.get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|_| VhostUserError::RingOutside(i))
            };
            // The used ring's guest address is where the backend logs its writes to the ring
            // while the dirty log is on: without it libvhost-user (qemu-storage-daemon) logs
            // them at guest address 0, the ring's page is never sent again, and the destination
            // starts from a stale used ring (the guest then reads old entries: "id 0 is not a
            // head"). Always given, so that turning the log on needs no new SET_VRING_ADDR.
            let config = VringConfigData {
                queue_max_size: q.max_size,
                queue_size: q.size,
                flags: VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits(),
                desc_table_addr: hva(q.desc_table)?,
                used_ring_addr: hva(q.used_ring)?,
                avail_ring_addr: hva(q.avail_ring)?,
                log_addr: Some(q.used_ring),
            };
            self.fe
                .set_vring_num(i, q.size)
                .map_err(msg("SET_VRING_NUM"))?;
            self.fe
                .set_vring_addr(i, &config)
                .map_err(msg("SET_VRING_ADDR"))?;
            self.fe
                .set_vring_base(i, q.next_avail)
                .map_err(msg("SET_VRING_BASE"))?;
            self.fe
                .set_vring_call(i, call)
                .map_err(msg("SET_VRING_CALL"))?;
            self.fe
                .set_vring_kick(i, ring.kick)
                .map_err(msg("SET_VRING_KICK"))?;
            self.fe
                .set_vring_enable(i, true)
                .map_err(msg("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Stops `queues` rings; returns each one's next available index.
    pub fn stop(&mut self, queues: usize) -> Result<Vec<u16>, VhostUserError> {
        let _deadline = Deadline::arm(&self.socket, "GET_VRING_BASE");
        (0..queues)
            .map(|i| {
                self.fe
                    .get_vring_base(i)
                    .map(|base| base as u16)
                    .map_err(|e| VhostUserError::Message("GET_VRING_BASE", e))
            })
            .collect()
    }

    /// SET_LOG_BASE with the log's memfd. Spoken here rather than through the `vhost` crate:
    /// back-ends disagree on the reply's body (libvhost-user, so qemu-storage-daemon, answers
    /// a u64; vhost-user-backend echoes the log region), QEMU's frontend accepts either, the
    /// crate only the second. The caller holds the session, so nothing else uses the socket.
    fn set_log(&self, log: &DirtyLog) -> Result<(), VhostUserError> {
        let region = log.region();
        let mut msg = Vec::with_capacity(LOG_MSG_LEN);
        msg.extend_from_slice(&REQ_SET_LOG_BASE.to_le_bytes());
        msg.extend_from_slice(&HDR_VERSION_1.to_le_bytes());
        msg.extend_from_slice(&16u32.to_le_bytes());
        msg.extend_from_slice(&region.mmap_size.to_le_bytes());
        msg.extend_from_slice(&region.mmap_offset.to_le_bytes());
        let fds = [region.mmap_handle];
        let sent = sendmsg::<()>(
            self.socket.as_raw_fd(),
            &[IoSlice::new(&msg)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| VhostUserError::LogBase(e.into()))?;
        if sent != msg.len() {
            return Err(VhostUserError::LogBase(
                std::io::ErrorKind::WriteZero.into(),
            ));
        }
        let mut hdr = [0u8; HDR_LEN];
        (&self.socket)
            .read_exact(&mut hdr)
            .map_err(VhostUserError::LogBase)?;
        let field = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let (request, flags, size) = (field(0), field(4), field(8) as usize);
        if request != REQ_SET_LOG_BASE || flags & HDR_REPLY == 0 || size > MAX_REPLY_BODY {
            return Err(VhostUserError::LogBase(
                std::io::ErrorKind::InvalidData.into(),
            ));
        }
        let mut body = vec![0u8; size];
        (&self.socket)
            .read_exact(&mut body)
            .map_err(VhostUserError::LogBase)
    }

    /// Turns the backend's dirty logging on into `log` (or off), the guest's features
    /// unchanged.
    pub fn set_logging(
        &self,
        guest_features: u64,
        log: Option<&DirtyLog>,
    ) -> Result<(), VhostUserError> {
        let _deadline = Deadline::arm(&self.socket, "switch the dirty log");
        if let Some(log) = log {
            self.set_log(log)?;
        }
        self.set_features(guest_features, log.is_some())
    }
}

/// The socket is not there yet, or not listening yet.
fn retryable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}

/// The used ring's index in guest memory: how many requests the backend returned.
pub fn used_index(mem: &GuestMem, used_ring: u64) -> Option<u16> {
    mem.read_obj::<u16>(GuestAddress(used_ring.checked_add(2)?))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixListener;
    use vhost::vhost_user::message::VhostUserVringAddr;
    use vm_memory::ByteValued;

    /// VIRTIO_F_VERSION_1.
    const VERSION_1: u64 = 1 << 32;

    /// A backend that offers the least the frontend accepts (PROTOCOL_FEATURES, CONFIG; no
    /// REPLY_ACK, so only the GET requests are answered) and returns every message it got,
    /// as (request, body), once the frontend hangs up.
    fn recording_backend(listener: UnixListener) -> std::thread::JoinHandle<Vec<(u32, Vec<u8>)>> {
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut seen = Vec::new();
            let mut hdr = [0u8; HDR_LEN];
            // A plain read drops the messages' file descriptors (closed by the kernel).
            while s.read_exact(&mut hdr).is_ok() {
                let field = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
                let (request, size) = (field(0), field(8) as usize);
                let mut body = vec![0u8; size];
                s.read_exact(&mut body).expect("message body");
                let answer = match FrontendReq::try_from(request) {
                    Ok(FrontendReq::GET_FEATURES) => {
                        Some(VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | VERSION_1)
                    }
                    Ok(FrontendReq::GET_PROTOCOL_FEATURES) => {
                        Some(VhostUserProtocolFeatures::CONFIG.bits())
                    }
                    _ => None,
                };
                if let Some(value) = answer {
                    let mut reply = Vec::new();
                    for f in [request, HDR_VERSION_1 | HDR_REPLY, 8] {
                        reply.extend_from_slice(&f.to_le_bytes());
                    }
                    reply.extend_from_slice(&value.to_le_bytes());
                    s.write_all(&reply).expect("reply");
                }
                seen.push((request, body));
            }
            seen
        })
    }

    #[test]
    fn set_vring_addr_gives_the_used_ring_guest_address_as_the_log_address() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backend.sock");
        let backend = recording_backend(UnixListener::bind(&path).unwrap());
        let (mem, _file) = crate::memory::create_guest_memory(2).unwrap();
        let state = QueueState {
            max_size: 256,
            size: 256,
            ready: true,
            desc_table: 0x10_0000,
            avail_ring: 0x10_1000,
            used_ring: 0x10_2000,
            ..QueueState::default()
        };
        let kick = EventFd::new(0).unwrap();
        let call = EventFd::new(0).unwrap();
        let (mut session, watch) = Session::connect(&path, CONNECT_TIMEOUT).unwrap();
        session
            .start(
                &mem,
                &[RingSetup { state, kick: &kick }],
                VERSION_1,
                &call,
                None,
            )
            .unwrap();
        drop((session, watch));
        let seen = backend.join().unwrap();

        let (_, body) = seen
            .iter()
            .find(|(request, _)| *request == FrontendReq::SET_VRING_ADDR as u32)
            .expect("SET_VRING_ADDR sent");
        let addr = VhostUserVringAddr::from_slice(body).expect("a vring address body");
        let (flags, used, log) = (addr.flags, addr.used, addr.log);
        assert_eq!(
            flags & VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits(),
            VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits(),
            "VHOST_VRING_F_LOG set"
        );
        // The log is indexed by guest physical address; the ring addresses are the VMM's.
        assert_eq!(
            log, state.used_ring,
            "log address = the used ring's guest address"
        );
        let used_hva = mem.get_host_address(GuestAddress(state.used_ring)).unwrap() as u64;
        assert_eq!(used, used_hva, "used ring address = its address in the VMM");
    }
}
