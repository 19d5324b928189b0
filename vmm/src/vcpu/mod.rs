//! vCPU threads: one per vCPU, each a small state machine driven over a channel.
//!
//! ```text
//!            Resume               Pause (+ kick)
//!   Paused ─────────► Running ─────────────────► Paused
//!     │                  │ guest reset/shutdown, failure: event to the VM loop, then Exited
//!     └──── Exit ────────┴──── Exit (+ kick) ──► Exited
//! ```
//! Every transition is acknowledged on the state channel, so the VM loop knows when all vCPUs
//! are really out of KVM_RUN. A running vCPU is kicked out of KVM_RUN with a signal (see
//! [`kick`]), so a pause takes effect even while the guest computes without exiting.

pub mod dump;
pub mod kick;
pub mod regs;
pub mod state;

use crate::bus::Bus;
use crate::memory::GuestMem;
use crate::vm::VmEvent;
use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use state::{VcpuSaved, VcpuStateError};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;
use vmm_sys_util::signal::Killable;

/// Errors driving a vCPU thread.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// The thread could not be started.
    #[error("spawn vCPU thread")]
    Spawn(#[source] std::io::Error),
    /// The thread is gone.
    #[error("vCPU {0} thread has exited")]
    Gone(u8),
    /// The thread did not acknowledge in time.
    #[error("vCPU {0} did not reach {1:?} within {2:?}")]
    Timeout(u8, VcpuState, Duration),
    /// Saving or restoring needs the vCPU paused.
    #[error("vCPU {0} is running")]
    Running(u8),
    /// KVM refused to save or load the vCPU's state.
    #[error(transparent)]
    State(#[from] VcpuStateError),
}

/// What a vCPU thread is asked to do.
pub enum VcpuCommand {
    /// Leave KVM_RUN and wait.
    Pause,
    /// Run the guest.
    Resume,
    /// End the thread.
    Exit,
    /// Paused only: save the vCPU's state and send it back.
    Save(Sender<Result<Box<VcpuSaved>, VcpuError>>),
    /// Paused only: load this state (into a vCPU that has not run yet).
    Restore(Box<VcpuSaved>, Sender<Result<(), VcpuError>>),
    /// Running only: stay out of the guest this long (the migration throttle).
    Throttle(Duration),
}

/// State the vCPU threads share with the VM loop.
#[derive(Debug, Default)]
pub struct VcpuShared {
    /// KVM's MSR index list, for saving.
    pub msr_list: Vec<u32>,
    /// Wall-clock microseconds when a vCPU last went from paused to running: the loop clears
    /// it before a resume and the first vCPU to run sets it (the end of a migration's
    /// downtime).
    pub resumed_at_us: std::sync::atomic::AtomicU64,
    /// Exits to the VMM, by reason (`GET /v1/vm/counters`).
    pub exits: ExitStats,
}

/// vCPU exits to the VMM, counted by every vCPU thread (relaxed increments).
#[derive(Debug, Default)]
pub struct ExitStats {
    io: std::sync::atomic::AtomicU64,
    mmio: std::sync::atomic::AtomicU64,
    other: std::sync::atomic::AtomicU64,
    interrupted: std::sync::atomic::AtomicU64,
}

impl ExitStats {
    fn bump(counter: &std::sync::atomic::AtomicU64) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The counts as the API reports them.
    pub fn snapshot(&self) -> vmm_api::vm::ExitCounters {
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        vmm_api::vm::ExitCounters {
            io: load(&self.io),
            mmio: load(&self.mmio),
            other: load(&self.other),
            interrupted: load(&self.interrupted),
        }
    }
}

/// Microseconds since the Unix epoch (comparable between processes on one host).
pub fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The state a vCPU thread reports after each transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// In or about to enter KVM_RUN.
    Running,
    /// Out of KVM_RUN, waiting for a command.
    Paused,
    /// The thread is ending.
    Exited,
}

/// The VM loop's side of a vCPU thread.
pub struct VcpuHandle {
    /// vCPU index (= APIC id).
    pub index: u8,
    commands: Sender<VcpuCommand>,
    states: Receiver<VcpuState>,
    thread: Option<JoinHandle<()>>,
    state: VcpuState,
}

/// A way to send commands to a vCPU thread from outside the VM loop (the migration throttle).
#[derive(Clone)]
pub struct VcpuKicker {
    commands: Sender<VcpuCommand>,
    thread: libc::pthread_t,
}

impl VcpuKicker {
    /// Sends a command and kicks the thread out of KVM_RUN; false if the thread is gone.
    pub fn send(&self, cmd: VcpuCommand) -> bool {
        if self.commands.send(cmd).is_err() {
            return false;
        }
        // libc rather than nix: nix's pthread_kill takes only the standard signals, and the
        // kick is a real-time one.
        // SAFETY: the pthread_t belongs to a vCPU thread that is joined only after the VM
        // loop stopped every user of this kicker (the migration threads end first).
        unsafe { libc::pthread_kill(self.thread, kick::kick_signal()) };
        true
    }
}

impl VcpuHandle {
    /// A kicker for this vCPU.
    pub fn kicker(&self) -> Option<VcpuKicker> {
        use std::os::unix::thread::JoinHandleExt;
        Some(VcpuKicker {
            commands: self.commands.clone(),
            thread: self.thread.as_ref()?.as_pthread_t(),
        })
    }

    /// Sends a command and kicks the thread out of KVM_RUN.
    pub fn send(&self, cmd: VcpuCommand) -> Result<(), VcpuError> {
        self.commands
            .send(cmd)
            .map_err(|_| VcpuError::Gone(self.index))?;
        if let Some(t) = &self.thread {
            // The thread may already be gone; the channel tells us, not the signal.
            let _ = t.kill(kick::kick_signal());
        }
        Ok(())
    }

    /// Waits until the thread reports `want`.
    pub fn wait_for(&mut self, want: VcpuState, timeout: Duration) -> Result<(), VcpuError> {
        let deadline = Instant::now() + timeout;
        while self.state != want {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.states.recv_timeout(left) {
                Ok(s) => self.state = s,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(VcpuError::Timeout(self.index, want, timeout))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.state = VcpuState::Exited;
                    if want != VcpuState::Exited {
                        return Err(VcpuError::Gone(self.index));
                    }
                }
            }
        }
        Ok(())
    }

    /// Joins the thread (after it exited).
    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the exit handler decided.
enum Next {
    Continue,
    Stop(VmEvent),
}

/// A vCPU and what it needs to handle exits.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    mem: Arc<GuestMem>,
    events: Sender<VmEvent>,
    started: Instant,
    shared: Arc<VcpuShared>,
}

impl Vcpu {
    /// Wraps a configured vCPU fd. `started` is when the VMM process began, for the
    /// first-instruction log line.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: u8,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        mem: Arc<GuestMem>,
        events: Sender<VmEvent>,
        started: Instant,
        shared: Arc<VcpuShared>,
    ) -> Vcpu {
        Vcpu {
            index,
            fd,
            pio,
            mmio,
            mem,
            events,
            started,
            shared,
        }
    }

    /// Starts the thread, paused or running.
    pub fn spawn(self, paused: bool) -> Result<VcpuHandle, VcpuError> {
        let (cmd_tx, cmd_rx) = std::sync::mpsc::channel();
        let (state_tx, state_rx) = std::sync::mpsc::channel();
        let index = self.index;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run(cmd_rx, state_tx, paused))
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle {
            index,
            commands: cmd_tx,
            states: state_rx,
            thread: Some(thread),
            state: if paused {
                VcpuState::Paused
            } else {
                VcpuState::Running
            },
        })
    }

    fn run(mut self, commands: Receiver<VcpuCommand>, states: Sender<VcpuState>, paused: bool) {
        kick::set_current(&mut self.fd.get_kvm_run().immediate_exit);
        let mut state = if paused {
            VcpuState::Paused
        } else {
            VcpuState::Running
        };
        let mut first_run = true;
        loop {
            // Commands first: a kick means one is waiting.
            let cmd = if state == VcpuState::Paused {
                match commands.recv() {
                    Ok(c) => Some(c),
                    Err(_) => Some(VcpuCommand::Exit),
                }
            } else {
                match commands.try_recv() {
                    Ok(c) => Some(c),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => Some(VcpuCommand::Exit),
                }
            };
            match cmd {
                Some(VcpuCommand::Exit) => break,
                Some(VcpuCommand::Pause) => {
                    // Where each vCPU stopped: the first thing to look at when a guest hangs.
                    // The report is only built when debug logging is on for this module.
                    tracing::debug!(
                        "{}",
                        dump::report(&self.fd, &self.mem, self.index, "paused")
                    );
                    state = VcpuState::Paused;
                    let _ = states.send(state);
                    continue;
                }
                Some(VcpuCommand::Resume) => {
                    if state == VcpuState::Paused {
                        let _ = self.shared.resumed_at_us.compare_exchange(
                            0,
                            wall_us(),
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        );
                    }
                    state = VcpuState::Running;
                    let _ = states.send(state);
                }
                Some(VcpuCommand::Save(reply)) => {
                    let r = if state == VcpuState::Paused {
                        VcpuSaved::save(self.index, &self.fd, &self.shared.msr_list)
                            .map(Box::new)
                            .map_err(VcpuError::from)
                    } else {
                        Err(VcpuError::Running(self.index))
                    };
                    let _ = reply.send(r);
                    continue;
                }
                Some(VcpuCommand::Restore(saved, reply)) => {
                    let r = if state == VcpuState::Paused {
                        saved.restore(&self.fd).map_err(VcpuError::from)
                    } else {
                        Err(VcpuError::Running(self.index))
                    };
                    let _ = reply.send(r);
                    continue;
                }
                Some(VcpuCommand::Throttle(d)) => {
                    if state == VcpuState::Running {
                        std::thread::sleep(d);
                    }
                    continue;
                }
                None => {}
            }
            if first_run && self.index == 0 {
                first_run = false;
                tracing::info!(
                    since_start_us = self.started.elapsed().as_micros() as u64,
                    "first KVM_RUN"
                );
            }
            match self.run_once() {
                Next::Continue => {}
                Next::Stop(event) => {
                    let _ = self.events.send(event);
                    break;
                }
            }
        }
        kick::clear_current();
        let _ = states.send(VcpuState::Exited);
    }

    fn run_once(&mut self) -> Next {
        let what = match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    ExitStats::bump(&self.shared.exits.io);
                    if !self.pio.read(u64::from(port), data) {
                        tracing::trace!(port, "read from unclaimed port");
                    }
                    return Next::Continue;
                }
                VcpuExit::IoOut(port, data) => {
                    ExitStats::bump(&self.shared.exits.io);
                    if !self.pio.write(u64::from(port), data) {
                        tracing::trace!(port, "write to unclaimed port");
                    }
                    return Next::Continue;
                }
                VcpuExit::MmioRead(addr, data) => {
                    ExitStats::bump(&self.shared.exits.mmio);
                    if !self.mmio.read(addr, data) {
                        tracing::debug!(addr, "read from unclaimed MMIO");
                    }
                    return Next::Continue;
                }
                VcpuExit::MmioWrite(addr, data) => {
                    ExitStats::bump(&self.shared.exits.mmio);
                    if !self.mmio.write(addr, data) {
                        tracing::debug!(addr, "write to unclaimed MMIO");
                    }
                    return Next::Continue;
                }
                VcpuExit::IoapicEoi(_) | VcpuExit::Intr | VcpuExit::IrqWindowOpen => {
                    ExitStats::bump(&self.shared.exits.other);
                    return Next::Continue;
                }
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => {
                    return Next::Stop(VmEvent::GuestShutdown)
                }
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => {
                    return Next::Stop(VmEvent::GuestReset)
                }
                VcpuExit::Shutdown => {
                    let report = dump::report(
                        &self.fd,
                        &self.mem,
                        self.index,
                        "triple fault (KVM_EXIT_SHUTDOWN)",
                    );
                    return Next::Stop(VmEvent::TripleFault(report));
                }
                VcpuExit::InternalError => {
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                    // active member of the kvm_run union.
                    let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
                    let n = (internal.ndata as usize).min(internal.data.len());
                    format!(
                        "KVM internal error, suberror {} ({}), data {:x?}",
                        internal.suberror,
                        match internal.suberror {
                            1 => "emulation failure: an instruction KVM cannot emulate",
                            2 => "simultaneous exceptions",
                            3 => "delivery event",
                            _ => "unknown",
                        },
                        &internal.data[..n]
                    )
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    format!("KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x} on cpu {cpu}")
                }
                other => format!("unhandled exit {other:?}"),
            },
            Err(e) if e.errno() == libc::EINTR => {
                // Kicked: clear the request so the next KVM_RUN really runs; the loop reads
                // the command that came with the kick.
                ExitStats::bump(&self.shared.exits.interrupted);
                self.fd.set_kvm_immediate_exit(0);
                return Next::Continue;
            }
            Err(e) if e.errno() == libc::EAGAIN => return Next::Continue,
            Err(e) => format!("KVM_RUN failed: {e}"),
        };
        let report = dump::report(&self.fd, &self.mem, self.index, &what);
        Next::Stop(VmEvent::VcpuFailed(report))
    }
}
