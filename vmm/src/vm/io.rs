//! The VM's I/O runtime: one tokio current-thread runtime, driven by a thread of its own
//! (`vmm-io`), that runs the API server, the virtio-blk queue workers, the storaged
//! connections and the stop-signal watch. File reads and writes go to tokio's blocking pool,
//! as on any runtime.
//!
//! One thread is enough for this work (it waits on sockets and eventfds; the data copies of a
//! migration have threads of their own), and it keeps tokio's multi-thread scheduler, its
//! worker threads and their stacks out of the process.

use std::future::Future;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::runtime::{Builder, Handle, Runtime};
use tokio::sync::oneshot;

/// The runtime and the thread that drives it. Dropped without [`IoRuntime::shutdown`], the
/// thread ends (its stop channel closes) and drops the runtime.
pub struct IoRuntime {
    runtime: Arc<Runtime>,
    /// Ends the driving thread's `block_on`.
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl IoRuntime {
    /// Builds the runtime and starts the thread that drives it.
    pub fn start() -> std::io::Result<IoRuntime> {
        let runtime = Arc::new(
            Builder::new_current_thread()
                .thread_name("vmm-io")
                .enable_all()
                .build()?,
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let driven = runtime.clone();
        let thread = std::thread::Builder::new()
            .name("vmm-io".into())
            .spawn(move || {
                let _ = driven.block_on(stopped);
            })?;
        Ok(IoRuntime {
            runtime,
            stop,
            thread,
        })
    }

    /// The handle tasks are spawned with.
    pub fn handle(&self) -> &Handle {
        self.runtime.handle()
    }

    /// Runs `future` to completion on the calling thread (which must not be a runtime
    /// thread); the tasks it waits for run on the driving thread meanwhile.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Stops the driving thread, then the runtime: tasks still running are dropped, blocking
    /// work gets up to `timeout` to finish.
    pub fn shutdown(self, timeout: Duration) {
        let IoRuntime {
            runtime,
            stop,
            thread,
        } = self;
        let _ = stop.send(());
        let _ = thread.join();
        // The thread's clone is gone with it.
        if let Some(runtime) = Arc::into_inner(runtime) {
            runtime.shutdown_timeout(timeout);
        }
    }
}
