//! A VMM whose guest is a tiny hand-made PVH kernel that halts in a loop: it starts at once, and
//! its migration stream is all the real protocol (memory, vCPU and device state) without a
//! Linux boot. For the tests of the stream itself (who may connect, in TLS or not).

use crate::vmm::{api_call, api_call_body};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Guest physical address the code is loaded at and entered at.
pub const ENTRY: u64 = 0x20_0000;
/// hlt; jmp -3.
const HLT_LOOP: &[u8] = &[0xf4, 0xeb, 0xfd];
/// How long the VMM may take to answer on its API socket.
const START: Duration = Duration::from_secs(30);

/// An ELF64 kernel with one PT_LOAD of `code` at [`ENTRY`] and the PVH entry note.
pub fn pvh_kernel(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    const NOTE_AT: usize = EHDR + 2 * PHDR;
    const NOTE_LEN: usize = 12 + 4 + 4;
    const CODE_AT: usize = 256;
    let mut f = vec![0u8; CODE_AT + code.len()];
    let put16 = |f: &mut [u8], at: usize, v: u16| f[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |f: &mut [u8], at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |f: &mut [u8], at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_le_bytes());
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // ELF version
    put16(&mut f, 16, 2); // ET_EXEC
    put16(&mut f, 18, 0x3e); // x86-64
    put32(&mut f, 20, 1);
    put64(&mut f, 24, ENTRY);
    put64(&mut f, 32, EHDR as u64);
    put16(&mut f, 52, EHDR as u16);
    put16(&mut f, 54, PHDR as u16);
    put16(&mut f, 56, 2);
    let p = EHDR; // PT_LOAD
    put32(&mut f, p, 1);
    put32(&mut f, p + 4, 5);
    put64(&mut f, p + 8, CODE_AT as u64);
    put64(&mut f, p + 16, ENTRY);
    put64(&mut f, p + 24, ENTRY);
    put64(&mut f, p + 32, code.len() as u64);
    put64(&mut f, p + 40, code.len() as u64);
    put64(&mut f, p + 48, 0x1000);
    let p = EHDR + PHDR; // PT_NOTE, XEN_ELFNOTE_PHYS32_ENTRY
    put32(&mut f, p, 4);
    put32(&mut f, p + 4, 4);
    put64(&mut f, p + 8, NOTE_AT as u64);
    put64(&mut f, p + 32, NOTE_LEN as u64);
    put64(&mut f, p + 40, NOTE_LEN as u64);
    put64(&mut f, p + 48, 4);
    put32(&mut f, NOTE_AT, 4);
    put32(&mut f, NOTE_AT + 4, 4);
    put32(&mut f, NOTE_AT + 8, 18);
    f[NOTE_AT + 12..NOTE_AT + 16].copy_from_slice(b"Xen\0");
    put32(&mut f, NOTE_AT + 16, ENTRY as u32);
    f[CODE_AT..].copy_from_slice(code);
    f
}

/// Writes the halting kernel into `dir`; returns its path.
pub fn hlt_kernel(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("hlt.elf");
    std::fs::write(&path, pvh_kernel(HLT_LOOP))?;
    Ok(path)
}

/// A `vmm run` of the halting kernel (64 MiB, one vCPU, no disk); killed on drop.
pub struct TinyVmm {
    child: Child,
    /// The API socket.
    pub api: PathBuf,
    /// stderr.
    pub log: PathBuf,
}

impl TinyVmm {
    /// Starts `vmm run` of `kernel` named `name` in `dir` with further `args` (`--tls-dir`,
    /// `--incoming`, ...); returns once its API answers.
    pub fn start(dir: &Path, name: &str, kernel: &Path, args: &[&str]) -> Result<TinyVmm> {
        Self::start_env(dir, name, kernel, args, &[])
    }

    /// [`Self::start`] with environment variables `env` (e.g. a fault point, `VMHOP_STALL_AT`).
    pub fn start_env(
        dir: &Path,
        name: &str,
        kernel: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<TinyVmm> {
        let api = dir.join(format!("{name}.api"));
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(crate::binary("vmm"))
            .arg("run")
            .arg("--kernel")
            .arg(kernel)
            .args(["--name", name, "--memory", "64", "--serial", "none"])
            .arg("--api-socket")
            .arg(&api)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("spawn vmm")?;
        let mut vmm = TinyVmm { child, api, log };
        let t = Instant::now();
        while vmm.migration().is_err() {
            if let Some(status) = vmm.child.try_wait()? {
                bail!("vmm exited ({status}): {}", vmm.stderr());
            }
            if t.elapsed() > START {
                bail!("vmm did not answer within {START:?}: {}", vmm.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(vmm)
    }

    /// `GET /v1/migration` as JSON.
    pub fn migration(&self) -> Result<serde_json::Value> {
        let (code, body) = api_call(&self.api, "GET", "/v1/migration")?;
        if code != 200 {
            bail!("GET /v1/migration: {code} {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// `GET /v1/vm` as JSON.
    pub fn info(&self) -> Result<serde_json::Value> {
        let (code, body) = api_call(&self.api, "GET", "/v1/vm")?;
        if code != 200 {
            bail!("GET /v1/vm: {code} {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// `POST /v1/migration/send` with `params` (JSON); returns the status and the body.
    pub fn send(&self, params: &serde_json::Value) -> Result<(u16, String)> {
        api_call_body(&self.api, "POST", "/v1/migration/send", &params.to_string())
    }

    /// Waits until the migration's phase is one of `phases`, or the VMM exits.
    pub fn wait_phase(&mut self, phases: &[&str], timeout: Duration) -> Result<serde_json::Value> {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("vmm exited ({status}): {}", self.stderr());
            }
            let m = self.migration()?;
            if phases.contains(&m["phase"].as_str().unwrap_or_default()) {
                return Ok(m);
            }
            if t.elapsed() > timeout {
                bail!("migration still {} after {timeout:?}: {m}", m["phase"]);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the VMM to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if t.elapsed() > timeout {
                bail!("vmm still running after {timeout:?}: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An API call: the status and the body.
    pub fn api(&self, method: &str, path: &str) -> Result<(u16, String)> {
        api_call(&self.api, method, path)
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TinyVmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
