//! The host side of COM1: an output thread draining the UART's channel to stdout, a file or a
//! Unix socket client, and input threads feeding stdin or the socket client into the UART.
//!
//! The socket serves one client at a time; output produced while no client is connected is
//! kept (up to [`BACKLOG_MAX`] bytes, oldest dropped) and sent to the next client first, so a
//! test that connects after boot still sees the whole console.

use super::device::SerialDevice;
use crate::bus::lock;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use thiserror::Error;
use vmm_api::config::SerialConfig;
use vmm_sys_util::eventfd::EventFd;

/// Console output kept for a socket client that has not connected yet.
pub const BACKLOG_MAX: usize = 1 << 20;

/// Errors setting up the console.
#[derive(Debug, Error)]
pub enum ConsoleError {
    /// The output file could not be opened.
    #[error("open serial output file {0}")]
    File(String, #[source] std::io::Error),
    /// The socket could not be bound.
    #[error("bind serial socket {0}")]
    Bind(String, #[source] std::io::Error),
    /// A console thread could not be started.
    #[error("start console thread")]
    Thread(#[source] std::io::Error),
    /// Duplicating the FIFO eventfd failed.
    #[error("clone eventfd")]
    EventFd(#[source] std::io::Error),
}

#[derive(Default)]
struct SocketSink {
    client: Option<UnixStream>,
    backlog: VecDeque<u8>,
}

/// Starts the console threads for `config`. `output` receives what the UART transmits;
/// `fifo_empty` is the eventfd the UART signals when its receive FIFO drains.
pub fn start_console(
    config: &SerialConfig,
    output: Receiver<Vec<u8>>,
    device: Arc<Mutex<SerialDevice>>,
    fifo_empty: &EventFd,
) -> Result<(), ConsoleError> {
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map(|_| ())
            .map_err(ConsoleError::Thread)
    };
    match config {
        SerialConfig::None => spawn("serial-out", Box::new(move || for _ in output {})),
        SerialConfig::Stdio => {
            spawn(
                "serial-out",
                Box::new(move || {
                    let mut out = std::io::stdout();
                    for bytes in output.iter() {
                        if out.write_all(&bytes).and_then(|_| out.flush()).is_err() {
                            break;
                        }
                    }
                    // stdout is gone: keep draining so the UART never blocks.
                    for _ in output.iter() {}
                }),
            )?;
            let empty = fifo_empty.try_clone().map_err(ConsoleError::EventFd)?;
            spawn(
                "serial-in",
                Box::new(move || feed(std::io::stdin(), &device, &empty)),
            )
        }
        SerialConfig::File(path) => {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| ConsoleError::File(path.display().to_string(), e))?;
            spawn(
                "serial-out",
                Box::new(move || {
                    for bytes in output {
                        if let Err(e) = file.write_all(&bytes) {
                            tracing::warn!(error = %e, "serial output file");
                        }
                    }
                }),
            )
        }
        SerialConfig::Socket(path) => {
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path)
                .map_err(|e| ConsoleError::Bind(path.display().to_string(), e))?;
            let sink = Arc::new(Mutex::new(SocketSink::default()));
            let out_sink = sink.clone();
            spawn(
                "serial-out",
                Box::new(move || {
                    for bytes in output {
                        let mut s = lock(&out_sink);
                        if let Some(c) = s.client.as_mut() {
                            if c.write_all(&bytes).is_ok() {
                                continue;
                            }
                            s.client = None;
                        }
                        s.backlog.extend(bytes);
                        let excess = s.backlog.len().saturating_sub(BACKLOG_MAX);
                        s.backlog.drain(..excess);
                    }
                }),
            )?;
            let empty = fifo_empty.try_clone().map_err(ConsoleError::EventFd)?;
            spawn(
                "serial-accept",
                Box::new(move || accept_loop(listener, sink, device, empty)),
            )
        }
    }
}

fn accept_loop(
    listener: UnixListener,
    sink: Arc<Mutex<SocketSink>>,
    device: Arc<Mutex<SerialDevice>>,
    empty: EventFd,
) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let Ok(reader) = conn.try_clone() else {
            continue;
        };
        {
            let mut s = lock(&sink);
            let backlog: Vec<u8> = s.backlog.drain(..).collect();
            if conn.write_all(&backlog).is_err() {
                s.backlog.extend(backlog);
                continue;
            }
            s.client = Some(conn);
        }
        let device = device.clone();
        let Ok(empty) = empty.try_clone() else {
            continue;
        };
        // One reader per client; it ends when the client closes.
        let _ = std::thread::Builder::new()
            .name("serial-in".into())
            .spawn(move || feed(reader, &device, &empty));
    }
}

/// Copies `source` into the UART's receive FIFO, waiting for the guest to drain it when full.
fn feed(mut source: impl Read, device: &Mutex<SerialDevice>, fifo_empty: &EventFd) {
    let mut buf = [0u8; 256];
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let k = lock(device).enqueue_input(rest);
            rest = &rest[k..];
            if !rest.is_empty() && fifo_empty.read().is_err() {
                return;
            }
        }
    }
}
