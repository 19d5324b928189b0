//! The vhost-user block device: what it offers the guest (from the backend, masked), starting
//! and stopping the backend's rings as the transport asks, its saved state, and the handle
//! the migration's dirty tracking uses.

use super::frontend::{used_index, RingSetup, Session, CONNECT_TIMEOUT};
use super::log::DirtyLog;
use super::{monitor, VhostUserError};
use crate::devices::virtio::block::{BlockState, BlockStateError};
use crate::devices::virtio::{read_config_bytes, Activation, VirtioDevice, VirtioError};
use crate::memory::GuestMem;
use crate::migration::dirty::DirtyPages;
use crate::persist::Persist;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{Queue, QueueState};
use vmm_api::config::VhostUserDiskConfig;
use vmm_disk::offer::{CONFIG_LEN, CONFIG_NUM_QUEUES};
use vmm_disk::{QUEUE_SIZE, SECTOR_SIZE};
use vmm_sys_util::eventfd::EventFd;

/// virtio device id of a block device.
const VIRTIO_ID_BLOCK: u32 = 2;

/// Feature bits a backend may offer the guest through this transport: the virtio-blk
/// device's own (bits 0-23) except a writable cache mode (configuration writes are not
/// forwarded), and the split ring's indirect descriptors and event index. VERSION_1 is the
/// transport's; packed rings, IN_ORDER, platform access and notification data are not
/// implemented here.
const GUEST_FEATURES: u64 = ((1 << 24) - 1) & !(1 << VIRTIO_BLK_F_CONFIG_WCE)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX);

/// The data path as the guest's driver set it up: what a (re)connected backend is given.
pub(super) struct Running {
    pub mem: Arc<GuestMem>,
    pub queues: Vec<(QueueState, EventFd)>,
    /// Features the driver acknowledged.
    pub features: u64,
    /// The irqfd, as the backend's call eventfd.
    pub call: EventFd,
}

/// The connection and what runs on it.
pub(super) struct Conn {
    /// `None` while the backend is gone.
    pub session: Option<Session>,
    pub running: Option<Running>,
    /// The migration's dirty logging is on.
    pub logging: bool,
}

/// What the device and its monitor thread share.
pub(super) struct Shared {
    pub socket: PathBuf,
    pub conn: Mutex<Conn>,
    pub log: DirtyLog,
    /// The offer the guest saw (a reconnected backend must make the same).
    pub features: u64,
    pub size: u64,
    pub stop: AtomicBool,
}

impl Shared {
    pub fn conn(&self) -> MutexGuard<'_, Conn> {
        // Fields are replaced whole; a panic elsewhere cannot leave one half-written.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the data path of `conn` on its session, if both are there.
    pub fn start(&self, conn: &mut Conn) -> Result<(), VhostUserError> {
        let log = conn.logging.then_some(&self.log);
        let (Some(session), Some(running)) = (conn.session.as_mut(), conn.running.as_ref()) else {
            return Ok(());
        };
        let rings: Vec<RingSetup<'_>> = running
            .queues
            .iter()
            .map(|(state, kick)| RingSetup {
                state: *state,
                kick,
            })
            .collect();
        session.start(&running.mem, &rings, running.features, &running.call, log)
    }
}

/// A block device whose queues a vhost-user backend serves.
pub struct VhostUserBlk {
    shared: Arc<Shared>,
    queue_sizes: Vec<u16>,
    config: Vec<u8>,
}

impl VhostUserBlk {
    /// Connects to the backend of `cfg` and reads what it offers; `read_only` adds
    /// VIRTIO_BLK_F_RO to the offer. `mem` sizes the dirty log.
    pub fn connect(
        cfg: &VhostUserDiskConfig,
        read_only: bool,
        mem: &GuestMem,
    ) -> Result<VhostUserBlk, VhostUserError> {
        let (mut session, watch) = Session::connect(&cfg.socket, CONNECT_TIMEOUT)?;
        if session.queue_num < u64::from(cfg.queues) {
            return Err(VhostUserError::Queues {
                offered: session.queue_num,
                wanted: cfg.queues,
            });
        }
        let mut features = session.backend_features & GUEST_FEATURES;
        if cfg.queues > 1 {
            if features & (1 << VIRTIO_BLK_F_MQ) == 0 {
                return Err(VhostUserError::Lacks("VIRTIO_BLK_F_MQ"));
            }
        } else {
            features &= !(1 << VIRTIO_BLK_F_MQ);
        }
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        let mut config = session.config(CONFIG_LEN as u32)?;
        config.resize(CONFIG_LEN, 0);
        config[CONFIG_NUM_QUEUES..CONFIG_NUM_QUEUES + 2].copy_from_slice(&cfg.queues.to_le_bytes());
        let capacity = u64::from_le_bytes(config[0..8].try_into().expect("8 bytes"));
        let size = capacity.saturating_mul(SECTOR_SIZE);
        tracing::info!(socket = %cfg.socket.display(), size, queues = cfg.queues,
            backend_features = format_args!("{:#x}", session.backend_features),
            protocol = ?session.protocol, "vhost-user backend connected");
        let shared = Arc::new(Shared {
            socket: cfg.socket.clone(),
            conn: Mutex::new(Conn {
                session: Some(session),
                running: None,
                logging: false,
            }),
            log: DirtyLog::new(mem)?,
            features,
            size,
            stop: AtomicBool::new(false),
        });
        monitor::spawn(shared.clone(), watch).map_err(VhostUserError::Monitor)?;
        Ok(VhostUserBlk {
            shared,
            queue_sizes: vec![QUEUE_SIZE; usize::from(cfg.queues)],
            config,
        })
    }

    /// The handle the migration's dirty tracking uses.
    pub fn dirty_logging(&self) -> DirtyLogging {
        DirtyLogging(self.shared.clone())
    }
}

impl Drop for VhostUserBlk {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.shared.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "ignored write to virtio-blk configuration");
    }

    fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
        let call = a
            .interrupt
            .irqfd()
            .try_clone()
            .map_err(|e| VirtioError::Activate("clone the irqfd", e))?;
        let running = Running {
            mem: a.mem,
            queues: a
                .queues
                .into_iter()
                .map(|(q, kick)| (q.state(), kick))
                .collect(),
            features: a.features,
            call,
        };
        let mut conn = self.shared.conn();
        conn.running = Some(running);
        if conn.session.is_none() {
            tracing::warn!(socket = %self.shared.socket.display(),
                "vhost-user backend not connected: the disk starts when it is back");
            return Ok(());
        }
        self.shared.start(&mut conn).map_err(VirtioError::VhostUser)
    }

    fn reset(&mut self) {
        let mut conn = self.shared.conn();
        if let Some(running) = conn.running.take() {
            if let Some(session) = conn.session.as_mut() {
                if let Err(e) = session.stop(running.queues.len()) {
                    tracing::warn!(error = %vmhop_common::error::chain(&e),
                        "vhost-user backend: stop the rings on a driver reset");
                }
            }
        }
    }

    fn quiesce(&mut self) -> Result<Vec<Queue>, VirtioError> {
        let mut conn = self.shared.conn();
        let Some(running) = conn.running.take() else {
            return Err(VirtioError::DataPathGone);
        };
        let stopped = match conn.session.as_mut() {
            Some(session) => session.stop(running.queues.len()),
            None => Err(VhostUserError::Disconnected),
        };
        let bases = match stopped {
            Ok(bases) => bases,
            Err(e) => {
                // Some rings may have stopped: start them all again, as they were.
                conn.running = Some(running);
                if let Err(again) = self.shared.start(&mut conn) {
                    tracing::error!(error = %vmhop_common::error::chain(&again),
                        "vhost-user backend: restart the rings after a failed stop");
                }
                return Err(VirtioError::VhostUser(e));
            }
        };
        let mut queues = Vec::new();
        for (i, ((mut state, _), base)) in running.queues.into_iter().zip(bases).enumerate() {
            state.next_avail = base;
            // Everything popped has completed: the used index is where the device stands.
            state.next_used = used_index(&running.mem, state.used_ring).unwrap_or(base);
            queues.push(Queue::try_from(state).map_err(|_| VirtioError::InvalidQueue(i))?);
        }
        Ok(queues)
    }
}

impl Persist for VhostUserBlk {
    type State = BlockState;
    type Error = BlockStateError;

    fn save(&self) -> Result<BlockState, BlockStateError> {
        Ok(BlockState {
            features: self.shared.features,
            size: self.shared.size,
        })
    }

    fn restore(&mut self, saved: &BlockState) -> Result<(), BlockStateError> {
        saved.check(&self.save()?)
    }
}

/// The migration's handle on a vhost-user disk's dirty log.
#[derive(Clone)]
pub struct DirtyLogging(Arc<Shared>);

impl DirtyLogging {
    /// Starts logging: from now on every page the backend writes is in the log.
    pub fn start(&self) -> Result<(), VhostUserError> {
        let shared = &self.0;
        let mut conn = shared.conn();
        let Some(session) = conn.session.as_ref() else {
            return Err(VhostUserError::Disconnected);
        };
        if !session.can_log() {
            return Err(VhostUserError::CannotLog);
        }
        shared.log.clear();
        if let Some(running) = &conn.running {
            session.set_logging(running.features, Some(&shared.log))?;
        }
        conn.logging = true;
        Ok(())
    }

    /// Stops logging.
    pub fn stop(&self) -> Result<(), VhostUserError> {
        let mut conn = self.0.conn();
        conn.logging = false;
        match (&conn.session, &conn.running) {
            (Some(session), Some(running)) => session.set_logging(running.features, None),
            _ => Ok(()),
        }
    }

    /// ORs the pages logged since the last call into `into`, and clears them.
    pub fn take_into(&self, into: &mut DirtyPages) {
        self.0.log.take_into(into);
    }
}
