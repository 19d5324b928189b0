//! The test guest's init. See the library docs for the protocol it speaks on /dev/ttyS0.

mod disk;
mod memory;
mod sys;

use guest_agent::{LINE_PREFIX, PROTOCOL_VERSION};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};

const SERIAL: &str = "/dev/ttyS0";
const DEFAULT_DISK: &str = "/dev/vdb";

struct Agent {
    out: File,
    boot_id: String,
    memory: Option<memory::Memory>,
    disk: Option<disk::Disk>,
}

fn main() {
    for (fs, dir) in [("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")] {
        if let Err(e) = sys::mount(fs, dir) {
            eprintln!("agent: mount {fs} on {dir}: {e}");
        }
    }
    // Console messages below "error" would interleave with the protocol.
    let _ = std::fs::write("/proc/sys/kernel/printk", "4");
    let serial = loop {
        match OpenOptions::new().read(true).write(true).open(SERIAL) {
            Ok(f) => break f,
            Err(e) => {
                // As init we may not exit; say why and retry.
                eprintln!("agent: open {SERIAL}: {e}");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    };
    if let Err(e) = sys::set_raw(&serial) {
        eprintln!("agent: raw mode on {SERIAL}: {e}");
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mut agent = Agent {
        out: serial.try_clone().expect("dup serial fd"),
        boot_id,
        memory: None,
        disk: None,
    };
    let ready = format!(
        "ready version={PROTOCOL_VERSION} boot_id={} uptime_ms={} cpus={}",
        agent.boot_id,
        uptime_ms(),
        sys::cpu_count()
    );
    agent.send(&ready);
    let mut input = BufReader::new(serial);
    let mut line = String::new();
    loop {
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) => std::thread::sleep(std::time::Duration::from_millis(100)),
            Ok(_) => {
                let cmd = line.trim();
                if cmd.is_empty() {
                    continue;
                }
                let reply = match agent.handle(cmd) {
                    Ok(text) => format!("ok {text}"),
                    Err(text) => format!("err {text}"),
                };
                agent.send(&reply);
            }
            Err(e) => {
                eprintln!("agent: read {SERIAL}: {e}");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
}

fn uptime_ms() -> u64 {
    sys::clock_ns(libc::CLOCK_BOOTTIME) / 1_000_000
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
                let started = std::time::Instant::now();
                let m =
                    memory::Memory::start(mib, threads).map_err(|e| format!("mem start: {e}"))?;
                self.memory = Some(m);
                Ok(format!(
                    "mem started mib={mib} threads={threads} touch_ms={}",
                    started.elapsed().as_millis()
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

fn number(s: &str, what: &str) -> Result<usize, String> {
    s.parse().map_err(|_| format!("{what}: not a number: {s}"))
}
