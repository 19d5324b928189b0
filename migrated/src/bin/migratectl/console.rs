//! `migratectl console NAME`: the terminal attached to a guest's serial console (COM1), like
//! `virsh console`.
//!
//! The VMM serves the console on the Unix socket `serial.sock` in the instance's directory,
//! one client at a time (a new client takes the output over; what the guest wrote while nobody
//! was attached is kept, up to 1 MiB, and sent first). That socket is local to the guest's host,
//! so the console works through the local migrated only. When stdin is a terminal it is put in
//! raw mode (every key goes to the guest, Ctrl-C included) and restored on the way out. The
//! escape character Ctrl-] ([`ESCAPE`]) detaches; so does the end of stdin. The guest goes on
//! running either way.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use thiserror::Error;

/// The byte that detaches: Ctrl-] (group separator), as in virsh and telnet.
pub const ESCAPE: u8 = 0x1d;

/// Why the console could not be attached.
#[derive(Debug, Error)]
pub enum ConsoleError {
    /// The serial socket does not accept the connection.
    #[error("the console socket {0} does not answer (is the VMM running?)")]
    Connect(String, #[source] std::io::Error),
    /// The terminal's mode could not be changed.
    #[error("setting the terminal to raw mode")]
    RawMode(#[source] std::io::Error),
    /// Copying between the terminal and the socket failed to start.
    #[error("starting the console's copy thread")]
    Thread(#[source] std::io::Error),
}

/// How an attached console ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The operator typed the escape character, or stdin ended.
    Detached,
    /// The VMM closed the socket (the guest's VMM ended).
    Closed,
}

/// Attaches stdin and stdout to the console socket `socket` of instance `name` until the
/// operator detaches or the VMM closes it.
pub fn attach(name: &str, socket: &Path) -> Result<Ended, ConsoleError> {
    let conn = UnixStream::connect(socket)
        .map_err(|e| ConsoleError::Connect(socket.display().to_string(), e))?;
    let to_guest = conn
        .try_clone()
        .map_err(|e| ConsoleError::Connect(socket.display().to_string(), e))?;
    let raw = if std::io::stdin().is_terminal() {
        Some(RawMode::enter(std::io::stdin().as_raw_fd()).map_err(ConsoleError::RawMode)?)
    } else {
        None
    };
    // In raw mode the terminal no longer turns "\n" into a new line.
    let eol = if raw.is_some() { "\r\n" } else { "\n" };
    eprint!("Connected to the console of {name}; escape character is ^] (Ctrl-]){eol}");
    let (done, ended) = mpsc::channel();
    let from_guest = done.clone();
    std::thread::Builder::new()
        .name("console-out".into())
        .spawn(move || {
            copy_out(conn);
            let _ = from_guest.send(Ended::Closed);
        })
        .map_err(ConsoleError::Thread)?;
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            copy_in(std::io::stdin(), to_guest);
            let _ = done.send(Ended::Detached);
        })
        .map_err(ConsoleError::Thread)?;
    let how = ended.recv().unwrap_or(Ended::Closed);
    drop(raw);
    Ok(how)
}

/// The guest's output to stdout, until the socket closes.
fn copy_out(mut conn: UnixStream) {
    let mut out = std::io::stdout();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                    return;
                }
            }
        }
    }
}

/// stdin to the guest, up to the escape character or the end of stdin.
fn copy_in(mut input: impl Read, mut conn: UnixStream) {
    let mut buf = [0u8; 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let (data, escaped) = match buf[..n].iter().position(|&b| b == ESCAPE) {
            Some(at) => (&buf[..at], true),
            None => (&buf[..n], false),
        };
        if conn.write_all(data).is_err() || escaped {
            return;
        }
    }
}

/// A terminal in raw mode; its former mode comes back on drop.
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    fn enter(fd: i32) -> std::io::Result<RawMode> {
        let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: tcgetattr(3) fills the termios it is given; its result is checked before the
        // value is read.
        if unsafe { libc::tcgetattr(fd, t.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: initialised by the successful tcgetattr above.
        let saved = unsafe { t.assume_init() };
        let mut raw = saved;
        // SAFETY: cfmakeraw(3) only changes the flags of the termios it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: tcsetattr(3) reads the termios it is given; fd is the terminal just read.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the mode read from the same terminal in `enter`.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the console sends to the guest stops at the escape character.
    #[test]
    fn input_stops_at_the_escape_character() {
        let (ours, mut guest) = UnixStream::pair().unwrap();
        let typed: &[u8] = b"ping\n\x1dnot sent\n";
        copy_in(typed, ours);
        let mut got = Vec::new();
        guest.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"ping\n");
    }
}
