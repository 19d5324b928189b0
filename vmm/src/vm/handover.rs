//! Moving the guest: saving and loading the whole state, and the control loop's side of an
//! outgoing or incoming migration (the streams themselves are [`crate::migration`]).

use super::kvm_state::KvmVmState;
use super::{lock, BuildError, Incoming, Role, Sending, Vm, VmError, VCPU_ACK_TIMEOUT};
use crate::api::ApiResponse;
use crate::migration::dirty::DirtyLog;
use crate::migration::receive::{CommitDone, DestCtx, DestVm};
use crate::migration::send::{Outcome, SourceCtx, StopCopy};
use crate::migration::transport::Gate;
use crate::migration::wire::Commit;
use crate::migration::{self, MigrationRole, MigrationStatus, Phase, ResumeMode, SendParams};
use crate::persist::{self, Persist, VmState};
use crate::vcpu::wall_us;
use crate::vcpu::VcpuCommand;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vmhop_common::error::chain as error_chain;
use vmm_api::vm::RunState;

impl Vm {
    /// Destination: binds the stream listener and starts the receiving thread.
    pub(super) fn listen(&mut self, incoming: &Incoming) -> Result<(), BuildError> {
        let addr = incoming.addr.as_str();
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|e| BuildError::Listen(addr.to_string(), e))?;
        tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            tls = self.stream_tls.is_some(), from = %incoming.from.as_deref().unwrap_or("-"),
            accept_timeout_s = incoming.accept_timeout.as_secs(),
            "waiting for an incoming migration");
        self.role = Role::Incoming;
        migration::update(&self.migration, |s| {
            s.role = MigrationRole::Destination;
            s.phase = Phase::Idle;
        });
        let ctx = DestCtx {
            listener,
            gate: Gate {
                tls: self.stream_tls.clone(),
                expect: incoming.from.clone(),
                deadline: Instant::now() + incoming.accept_timeout,
            },
            vm: DestVm {
                shape: self.shape(),
                mem: self.mem.clone(),
                status: self.migration.clone(),
                events: self.events_tx.clone(),
            },
        };
        std::thread::Builder::new()
            .name("mig-receive".into())
            .spawn(move || migration::receive::run(ctx))
            .map_err(|e| BuildError::Listen(addr.to_string(), e))?;
        Ok(())
    }

    /// Pauses the guest, drains every device and saves the whole state (see
    /// [`super::kvm_state`], [`crate::vcpu::state`] and [`crate::persist`] for the order of
    /// the KVM calls). Returns the state and when the vCPUs stopped. On failure the VM is as
    /// it was.
    pub(super) fn pause_and_save(&mut self) -> Result<(VmState, u64), VmError> {
        let was_running = self.state == RunState::Running;
        let paused_at = self.pause_vcpus()?;
        let saved = self.save_paused();
        if saved.is_err() {
            let r = if was_running {
                self.resume_here()
            } else {
                self.restart_data_paths()
            };
            if let Err(e) = r {
                tracing::error!(error = %error_chain(&e), "could not resume after a failed save");
            }
        }
        saved.map(|st| (st, paused_at))
    }

    pub(super) fn save_paused(&mut self) -> Result<VmState, VmError> {
        let t = Instant::now();
        for (i, d) in self.disks.iter().enumerate() {
            lock(d).quiesce().map_err(|e| VmError::Quiesce(i, e))?;
        }
        let drained_us = t.elapsed().as_micros() as u64;
        let kvm = KvmVmState::save(&self.vm_fd).map_err(VmError::SaveKvm)?;
        let (tx, rx) = std::sync::mpsc::channel();
        for v in &self.vcpus {
            v.send(VcpuCommand::Save(tx.clone()))
                .map_err(VmError::SaveVcpu)?;
        }
        let mut vcpus = Vec::new();
        for _ in &self.vcpus {
            let r = rx
                .recv_timeout(VCPU_ACK_TIMEOUT)
                .map_err(|_| VmError::SaveVcpuTimeout)?;
            vcpus.push(*r.map_err(VmError::SaveVcpu)?);
        }
        vcpus.sort_by_key(|v| v.index);
        let serial = lock(&self.serial).save().map_err(VmError::Serial)?;
        let i8042 = lock(&self.i8042).save().unwrap_or_else(|e| match e {});
        let mut disks = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            disks.push(lock(d).save().map_err(|e| VmError::Disk(i, e))?);
        }
        tracing::info!(
            drained_us,
            total_us = t.elapsed().as_micros() as u64,
            "vm state saved"
        );
        Ok(VmState {
            shape: self.shape(),
            kvm,
            vcpus,
            serial,
            i8042,
            disks,
        })
    }

    /// Loads a saved state into this VM, whose vCPUs have never run; the data paths stay
    /// stopped until [`Self::resume_here`].
    pub(super) fn load_state(&mut self, st: VmState) -> Result<(), VmError> {
        let t = Instant::now();
        st.check_shape(&self.shape()).map_err(VmError::State)?;
        st.kvm.restore(&self.vm_fd).map_err(VmError::LoadKvm)?;
        let (tx, rx) = std::sync::mpsc::channel();
        for (v, saved) in self.vcpus.iter().zip(st.vcpus) {
            v.send(VcpuCommand::Restore(Box::new(saved), tx.clone()))
                .map_err(VmError::LoadVcpu)?;
        }
        for _ in &self.vcpus {
            rx.recv_timeout(VCPU_ACK_TIMEOUT)
                .map_err(|_| VmError::LoadVcpuTimeout)?
                .map_err(VmError::LoadVcpu)?;
        }
        {
            let mut serial = lock(&self.serial);
            serial.restore(&st.serial).map_err(VmError::Serial)?;
            serial.open_input();
        }
        lock(&self.i8042)
            .restore(&st.i8042)
            .unwrap_or_else(|e| match e {});
        for (i, (d, saved)) in self.disks.iter().zip(&st.disks).enumerate() {
            lock(d).restore(saved).map_err(|e| VmError::Disk(i, e))?;
        }
        tracing::info!(took_us = t.elapsed().as_micros() as u64, "vm state loaded");
        Ok(())
    }

    pub(super) fn start_migration(&mut self, params: SendParams) -> Result<ApiResponse, VmError> {
        params.validate().map_err(VmError::Params)?;
        if self.role != Role::Own {
            return Err(VmError::MigrationExists(self.role));
        }
        if params.destination_host.is_some() && self.stream_tls.is_none() {
            return Err(VmError::NoStreamTls);
        }
        let abort = Arc::new(AtomicBool::new(false));
        let stream = Arc::new(Mutex::new(None));
        migration::update(&self.migration, |s| {
            *s = MigrationStatus {
                role: MigrationRole::Source,
                phase: Phase::Precopy,
                ..Default::default()
            }
        });
        let ctx = SourceCtx {
            params: params.clone(),
            name: self.config.name.clone(),
            shape: self.shape(),
            mem: self.mem.clone(),
            private_memory: self.memfd.is_none(),
            dirty: DirtyLog::new(
                self.vm_fd.clone(),
                self.mem.clone(),
                self.dirty_backends.clone(),
            ),
            status: self.migration.clone(),
            abort: abort.clone(),
            stream: stream.clone(),
            events: self.events_tx.clone(),
            kickers: self.vcpus.iter().filter_map(|v| v.kicker()).collect(),
            tls: self.stream_tls.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("mig-send".into())
            .spawn(move || migration::send::run(ctx))
            .map_err(VmError::SpawnMigration)?;
        tracing::info!(destination = %params.destination, downtime_limit_ms = params.downtime_limit_ms,
            max_iterations = params.max_iterations, throttle = params.throttle,
            resume = %params.resume, tls = self.stream_tls.is_some(),
            destination_host = params.destination_host.as_deref().unwrap_or("-"),
            "migration started");
        self.sending = Some(Sending {
            abort,
            stream,
            thread: Some(thread),
            paused: false,
            auto: params.resume == ResumeMode::Auto,
        });
        self.role = Role::Sending;
        Ok(ApiResponse::Accepted(migration::current(&self.migration)))
    }

    pub(super) fn abort_sending(&mut self) {
        if let Some(s) = &self.sending {
            s.abort.store(true, Ordering::SeqCst);
            if let Some(stream) = lock(&s.stream).as_ref() {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    pub(super) fn on_migration_stop(&mut self) -> Result<StopCopy, VmError> {
        let Some(sending) = &self.sending else {
            return Err(VmError::NoMigration);
        };
        if sending.abort.load(Ordering::SeqCst) {
            return Err(VmError::Aborted);
        }
        let was_running = self.state == RunState::Running;
        let (st, paused_at_us) = self.pause_and_save()?;
        if let Some(s) = &mut self.sending {
            s.paused = was_running;
        }
        let state = persist::encode(&st).map_err(VmError::State)?;
        Ok(StopCopy {
            state,
            paused_at_us,
        })
    }

    pub(super) fn on_migration_ended(&mut self, outcome: Outcome) {
        let Some(mut sending) = self.sending.take() else {
            return;
        };
        if let Some(t) = sending.thread.take() {
            let _ = t.join();
        }
        match outcome {
            Outcome::HandedOver => {
                self.role = if sending.auto {
                    Role::Gone
                } else {
                    Role::HandedOver
                };
            }
            Outcome::Undecided => {
                // Paused, and so it stays: only an abort takes the guest back (see
                // `Role::Undecided`). The data paths stay drained too.
                self.role = Role::Undecided;
            }
            Outcome::NotHandedOver => {
                self.role = Role::Own;
                // The guest runs again as it did before: the data paths restart, and the vCPUs
                // if the stop-and-copy paused them (an operator's pause stays).
                let r = if sending.paused {
                    self.resume_here()
                } else {
                    self.restart_data_paths()
                };
                if let Err(e) = r {
                    tracing::error!(
                        error = %error_chain(&e),
                        "could not resume the guest after the failed migration"
                    );
                }
            }
        }
    }

    pub(super) fn restart_data_paths(&self) -> Result<(), VmError> {
        for (i, d) in self.disks.iter().enumerate() {
            lock(d).unquiesce().map_err(|e| VmError::Unquiesce(i, e))?;
        }
        Ok(())
    }

    pub(super) fn on_incoming_state(&mut self, bytes: &[u8]) -> Result<(), VmError> {
        if self.role != Role::Incoming {
            return Err(VmError::UnexpectedState(self.role));
        }
        let st = persist::decode(bytes).map_err(VmError::State)?;
        self.load_state(st)?;
        self.role = Role::Loaded;
        Ok(())
    }

    pub(super) fn on_incoming_commit(
        &mut self,
        c: Commit,
        auto: bool,
    ) -> Result<CommitDone, VmError> {
        if self.role != Role::Loaded {
            return Err(VmError::UnexpectedCommit(self.role));
        }
        self.source_paused_at_us = c.paused_at_us;
        self.source_started_at_us = c.started_at_us;
        if !auto {
            self.role = Role::Committed;
            migration::update(&self.migration, |s| s.phase = Phase::HandedOver);
            tracing::info!("migration handed over; waiting for POST /v1/vm/resume");
            return Ok(CommitDone { resumed_at_us: 0 });
        }
        self.finish_incoming()
    }

    /// Destination: runs the guest and records the final figures.
    pub(super) fn finish_incoming(&mut self) -> Result<CommitDone, VmError> {
        self.resume_here()?;
        self.role = Role::Own;
        let resumed_at_us = match self.vcpu_shared.resumed_at_us.load(Ordering::SeqCst) {
            0 => wall_us(),
            t => t,
        };
        let downtime_us = resumed_at_us.saturating_sub(self.source_paused_at_us);
        let total_ms = resumed_at_us.saturating_sub(self.source_started_at_us) / 1000;
        migration::update(&self.migration, |s| {
            s.phase = Phase::Completed;
            s.downtime_us = downtime_us;
            s.downtime_ms = downtime_us.div_ceil(1000);
            s.paused_at_us = self.source_paused_at_us;
            s.resumed_at_us = resumed_at_us;
            s.total_ms = total_ms;
            s.bytes_remaining = 0;
        });
        tracing::info!(
            downtime_us,
            total_ms,
            "incoming migration completed; the guest runs here"
        );
        Ok(CommitDone { resumed_at_us })
    }
}
