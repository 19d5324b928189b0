//! A host-side connection to the guest agent over the guest's serial line.

use agent_proto::{Fields, Reply};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Lines of console output kept for error messages.
const TAIL_LINES: usize = 60;

/// The agent's end of a serial line: replies arrive in order, one per command.
pub struct AgentConn {
    input: Box<dyn Write + Send>,
    replies: Receiver<Reply>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl AgentConn {
    /// Starts reading `output` (the guest's serial output) on a thread, copying every line to
    /// `log`; commands are written to `input`.
    pub fn new(
        output: impl Read + Send + 'static,
        input: impl Write + Send + 'static,
        log: &Path,
    ) -> Result<AgentConn> {
        let mut log =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let (tx, rx) = channel();
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail2 = tail.clone();
        let echo = std::env::var_os("VMHOP_SERIAL_ECHO").is_some();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(output);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                let _ = writeln!(log, "{line}");
                if echo {
                    eprintln!("serial| {line}");
                }
                {
                    let mut t = tail2.lock().unwrap();
                    if t.len() == TAIL_LINES {
                        t.pop_front();
                    }
                    t.push_back(line.clone());
                }
                if let Some(reply) = Reply::parse_line(&line) {
                    if tx.send(reply).is_err() {
                        break;
                    }
                }
            }
        });
        Ok(AgentConn {
            input: Box::new(input),
            replies: rx,
            tail,
        })
    }

    /// The last lines of console output, for failure messages.
    pub fn console_tail(&self) -> String {
        self.tail
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn next_reply(&self, timeout: Duration, waiting_for: &str) -> Result<Reply> {
        match self.replies.recv_timeout(timeout) {
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => Err(anyhow!(
                "no agent reply to `{waiting_for}` within {timeout:?}; console:\n{}",
                self.console_tail()
            )),
            Err(RecvTimeoutError::Disconnected) => Err(anyhow!(
                "serial line closed while waiting for `{waiting_for}`; console:\n{}",
                self.console_tail()
            )),
        }
    }

    /// Waits for the agent's ready line and returns its fields.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Fields> {
        match self.next_reply(timeout, "ready")? {
            Reply::Ready(f) => Ok(f),
            other => bail!("expected the ready line, got {other:?}"),
        }
    }

    /// Sends one command and returns the fields of its `ok` reply; an `err` reply is an error.
    pub fn command(&mut self, cmd: &str, timeout: Duration) -> Result<Fields> {
        self.send(cmd)?;
        self.reply(cmd, timeout)
    }

    /// Writes one command without waiting for its reply (see [`Self::reply`]).
    pub fn send(&mut self, cmd: &str) -> Result<()> {
        self.input
            .write_all(format!("{cmd}\n").as_bytes())
            .context("write to serial")?;
        Ok(self.input.flush()?)
    }

    /// Waits for the reply to `cmd`, sent earlier with [`Self::send`].
    pub fn reply(&mut self, cmd: &str, timeout: Duration) -> Result<Fields> {
        match self.next_reply(timeout, cmd)? {
            Reply::Ok(f) => Ok(f),
            Reply::Err(e) => bail!("agent refused `{cmd}`: {e}"),
            Reply::Ready(_) => bail!("the guest rebooted (ready line) while waiting for `{cmd}`"),
        }
    }
}
