//! The test guest's init: a no_std program linked statically against musl. See the
//! agent-proto crate for the protocol it speaks on /dev/ttyS0.
#![no_std]
#![no_main]

extern crate alloc;

mod disk;
mod memory;
mod rt;
mod sys;

use agent_proto::{LINE_PREFIX, PROTOCOL_VERSION};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use sys::Fd;

const SERIAL: &str = "/dev/ttyS0";
const DEFAULT_DISK: &str = "/dev/vdb";

struct Agent {
    out: Fd,
    boot_id: String,
    memory: Option<memory::Memory>,
    disk: Option<disk::Disk>,
}

#[no_mangle]
extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    for (fs, dir) in [("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")] {
        if let Err(e) = sys::mount(fs, dir) {
            rt::eprint(&format!("agent: mount {fs} on {dir}: {e}\n"));
        }
    }
    // Console messages below "error" would interleave with the protocol.
    let _ = sys::write_text("/proc/sys/kernel/printk", "4");
    let serial = loop {
        match Fd::open(SERIAL, libc::O_RDWR | libc::O_NOCTTY) {
            Ok(f) => break f,
            Err(e) => {
                // As init we may not exit; say why and retry.
                rt::eprint(&format!("agent: open {SERIAL}: {e}\n"));
                sys::sleep_ms(1000);
            }
        }
    };
    if let Err(e) = serial.set_raw() {
        rt::eprint(&format!("agent: raw mode on {SERIAL}: {e}\n"));
    }
    let boot_id = sys::read_text("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mut agent = Agent {
        out: serial.dup().expect("dup serial"),
        boot_id,
        memory: None,
        disk: None,
    };
    let ready = format!(
        "ready version={PROTOCOL_VERSION} boot_id={} uptime_ms={} cpus={}",
        agent.boot_id,
        uptime_ms(),
        sys::cpus().len()
    );
    agent.send(&ready);

    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match serial.read(&mut buf) {
            Ok(0) => sys::sleep_ms(100),
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) => {
                rt::eprint(&format!("agent: read {SERIAL}: {e}\n"));
                sys::sleep_ms(1000);
            }
        }
        while let Some(end) = pending.iter().position(|&b| b == b'\n' || b == b'\r') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let cmd = String::from_utf8_lossy(&line);
            let cmd = cmd.trim();
            if cmd.is_empty() {
                continue;
            }
            let reply = match agent.handle(cmd) {
                Ok(text) => format!("ok {text}"),
                Err(text) => format!("err {text}"),
            };
            agent.send(&reply);
        }
    }
}

fn uptime_ms() -> u64 {
    sys::clock_ns(libc::CLOCK_BOOTTIME) / 1_000_000
}

fn number(s: &str, what: &str) -> Result<usize, String> {
    s.parse().map_err(|_| format!("{what}: not a number: {s}"))
}

impl Agent {
    fn send(&mut self, body: &str) {
        // One write per line: the console may interleave between writes, not within.
        let _ = self
            .out
            .write_all(format!("\n{LINE_PREFIX}{body}\n").as_bytes());
    }

    fn boot_id_bytes(&self) -> [u8; 16] {
        let mut id = [0u8; 16];
        for (d, s) in id.iter_mut().zip(self.boot_id.bytes()) {
            *d = s;
        }
        id
    }

    fn handle(&mut self, cmd: &str) -> Result<String, String> {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        match words.as_slice() {
            ["ping"] => Ok("pong".into()),
            ["clock"] => Ok(format!(
                "clock boot_id={} uptime_ms={}",
                self.boot_id,
                uptime_ms()
            )),
            ["mem", "start", rest @ ..] => {
                if self.memory.is_some() {
                    return Err("mem already running".into());
                }
                let mib = number(rest.first().copied().unwrap_or("16"), "MiB")?;
                let threads = number(rest.get(1).copied().unwrap_or("1"), "threads")?;
                if mib == 0 || threads == 0 || threads > 64 {
                    return Err("mem start: MiB and threads must be positive, threads <= 64".into());
                }
                let started = uptime_ms();
                let m =
                    memory::Memory::start(mib, threads).map_err(|e| format!("mem start: {e}"))?;
                self.memory = Some(m);
                let touch = uptime_ms() - started;
                Ok(format!(
                    "mem started mib={mib} threads={threads} touch_ms={touch}"
                ))
            }
            ["mem", "status"] => match &self.memory {
                Some(m) => Ok(m.status()),
                None => Err("mem not running".into()),
            },
            ["mem", "stop"] => match self.memory.take() {
                Some(m) => Ok(m.stop()),
                None => Err("mem not running".into()),
            },
            ["disk", "start", rest @ ..] => {
                if self.disk.is_some() {
                    return Err("disk already running".into());
                }
                let dev = rest.first().copied().unwrap_or(DEFAULT_DISK);
                let (d, next) = disk::Disk::start(dev, self.boot_id_bytes())
                    .map_err(|e| format!("disk start {dev}: {e}"))?;
                self.disk = Some(d);
                Ok(format!("disk started dev={dev} next={next}"))
            }
            ["disk", "status"] => match &self.disk {
                Some(d) => Ok(d.status()),
                None => Err("disk not running".into()),
            },
            ["disk", "stop"] => match self.disk.take() {
                Some(d) => Ok(format!("disk stopped acked={}", d.stop())),
                None => Err("disk not running".into()),
            },
            ["disk", "verify", rest @ ..] => {
                if let Some(d) = self.disk.take() {
                    d.stop();
                }
                let dev = rest.first().copied().unwrap_or(DEFAULT_DISK);
                let scan = disk::verify(dev).map_err(|e| format!("disk verify {dev}: {e}"))?;
                Ok(format!(
                    "disk verified={} boot_ids={}",
                    scan.valid, scan.boot_ids
                ))
            }
            ["reboot"] => {
                self.send("ok rebooting");
                sys::reboot(false);
                Err("reboot failed".into())
            }
            ["poweroff"] => {
                self.send("ok powering off");
                sys::reboot(true);
                Err("poweroff failed".into())
            }
            _ => Err(format!("unknown command: {cmd}")),
        }
    }
}
