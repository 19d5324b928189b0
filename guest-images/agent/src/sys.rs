//! Thin wrappers over the system calls the agent needs. Every guest system call costs
//! milliseconds on the emulating host, so callers batch their work.

use alloc::vec::Vec;
use core::fmt;

/// A failed system call's errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        // SAFETY: strerror returns a NUL-terminated static string for any errno.
        let text = unsafe { core::ffi::CStr::from_ptr(libc::strerror(self.0)) };
        write!(f, "{} (errno {})", text.to_str().unwrap_or("?"), self.0)
    }
}

/// Result of a system call.
pub type Result<T> = core::result::Result<T, Errno>;

fn errno() -> Errno {
    // SAFETY: __errno_location returns the calling thread's errno slot.
    Errno(unsafe { *libc::__errno_location() })
}

fn check(ret: libc::c_long) -> Result<usize> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret as usize)
    }
}

/// Repeats `io(done)` (one pread or pwrite of what is left after `done` bytes) until `len` bytes
/// are done; a return of 0 is an I/O error, EINTR a retry.
fn all_at(len: usize, mut io: impl FnMut(usize) -> isize) -> Result<()> {
    let mut done = 0;
    while done < len {
        match check(io(done) as libc::c_long) {
            Err(Errno(libc::EINTR)) => continue,
            Err(e) => return Err(e),
            Ok(0) => return Err(Errno(libc::EIO)),
            Ok(n) => done += n,
        }
    }
    Ok(())
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

/// An owned file descriptor.
pub struct Fd(i32);

impl Fd {
    /// open(2).
    pub fn open(path: &str, flags: i32) -> Result<Fd> {
        let p = cstr(path);
        // SAFETY: `p` is NUL-terminated.
        let fd = unsafe { libc::open(p.as_ptr().cast(), flags | libc::O_CLOEXEC) };
        check(fd as libc::c_long).map(|fd| Fd(fd as i32))
    }

    /// A second descriptor for the same file.
    pub fn dup(&self) -> Result<Fd> {
        // SAFETY: dup of a descriptor we own.
        check(unsafe { libc::dup(self.0) } as libc::c_long).map(|fd| Fd(fd as i32))
    }

    /// read(2): some bytes, 0 at end of file.
    pub fn read(&self, buf: &mut [u8]) -> Result<usize> {
        loop {
            // SAFETY: `buf` is valid for `len` bytes of writes.
            let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
            match check(n as libc::c_long) {
                Err(Errno(libc::EINTR)) => continue,
                other => return other,
            }
        }
    }

    /// Writes all of `buf`.
    pub fn write_all(&self, mut buf: &[u8]) -> Result<()> {
        while !buf.is_empty() {
            // SAFETY: `buf` is valid for `len` bytes of reads.
            let n = unsafe { libc::write(self.0, buf.as_ptr().cast(), buf.len()) };
            match check(n as libc::c_long) {
                Err(Errno(libc::EINTR)) => continue,
                Err(e) => return Err(e),
                Ok(n) => buf = &buf[n..],
            }
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        all_at(buf.len(), |done| {
            let rest = &mut buf[done..];
            // SAFETY: `rest` is valid for `len` bytes of writes.
            unsafe {
                libc::pread(
                    self.0,
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    (offset + done as u64) as i64,
                )
            }
        })
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        all_at(buf.len(), |done| {
            let rest = &buf[done..];
            // SAFETY: `rest` is valid for `len` bytes of reads.
            unsafe {
                libc::pwrite(
                    self.0,
                    rest.as_ptr().cast(),
                    rest.len(),
                    (offset + done as u64) as i64,
                )
            }
        })
    }

    /// fdatasync(2): for a block device, a cache flush.
    pub fn sync_data(&self) -> Result<()> {
        // SAFETY: no memory access.
        check(unsafe { libc::fdatasync(self.0) } as libc::c_long).map(drop)
    }

    /// Size of a block device in bytes.
    pub fn block_device_size(&self) -> Result<u64> {
        const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
        check(unsafe { libc::ioctl(self.0, BLKGETSIZE64 as _, &mut size) } as libc::c_long)?;
        Ok(size)
    }

    /// Puts a serial line in raw mode: no echo, no line editing, no CR/LF translation.
    pub fn set_raw(&self) -> Result<()> {
        // SAFETY: termios is plain data; tcgetattr fills it in before it is used.
        let mut t: libc::termios = unsafe { core::mem::zeroed() };
        // SAFETY: `t` is valid for writes.
        check(unsafe { libc::tcgetattr(self.0, &mut t) } as libc::c_long)?;
        // SAFETY: `t` is a valid termios.
        unsafe { libc::cfmakeraw(&mut t) };
        t.c_cc[libc::VMIN] = 1;
        t.c_cc[libc::VTIME] = 0;
        // SAFETY: `t` is a valid termios.
        check(unsafe { libc::tcsetattr(self.0, libc::TCSANOW, &t) } as libc::c_long).map(drop)
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

/// Reads a small text file (procfs).
pub fn read_text(path: &str) -> Result<alloc::string::String> {
    let fd = Fd::open(path, libc::O_RDONLY)?;
    let mut buf = [0u8; 256];
    let n = fd.read(&mut buf)?;
    Ok(alloc::string::String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Writes a small text file (procfs).
pub fn write_text(path: &str, text: &str) -> Result<()> {
    Fd::open(path, libc::O_WRONLY)?.write_all(text.as_bytes())
}

/// Mounts `fstype` at `target`; an already mounted target is fine.
pub fn mount(fstype: &str, target: &str) -> Result<()> {
    let (src, dst) = (cstr(fstype), cstr(target));
    // SAFETY: both strings are NUL-terminated and outlive the call.
    let ret = unsafe {
        libc::mount(
            src.as_ptr().cast(),
            dst.as_ptr().cast(),
            src.as_ptr().cast(),
            0,
            core::ptr::null(),
        )
    };
    match check(ret as libc::c_long) {
        Err(Errno(libc::EBUSY)) => Ok(()),
        other => other.map(drop),
    }
}

/// Sleeps (only where nothing else can be waited on: an init that must not exit).
pub fn sleep_ms(ms: u64) {
    let ts = libc::timespec {
        tv_sec: (ms / 1000) as _,
        tv_nsec: ((ms % 1000) * 1_000_000) as _,
    };
    // SAFETY: `ts` is valid; the remainder pointer may be null.
    unsafe { libc::nanosleep(&ts, core::ptr::null_mut()) };
}

/// The TSC, read without serialisation (a gap measurement, not a benchmark).
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects and is available on every x86_64 CPU.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Reads a clock in nanoseconds.
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    // SAFETY: timespec is plain data filled in by the call.
    let mut ts: libc::timespec = unsafe { core::mem::zeroed() };
    // SAFETY: `ts` is valid for writes.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The CPUs this process may run on.
pub fn cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data.
    let mut set: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    // SAFETY: pointer and size describe `set`.
    let ret =
        unsafe { libc::sched_getaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if ret != 0 {
        return alloc::vec![0];
    }
    // SAFETY: CPU_ISSET reads inside `set` for cpu < CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data.
    let mut set: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    // SAFETY: CPU_SET writes inside `set`; cpu comes from `cpus()`, so it is < CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pointer and size describe `set`.
    let ret = unsafe { libc::sched_setaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &set) };
    check(ret as libc::c_long).map(drop)
}

/// The CPU the calling thread runs on.
pub fn current_cpu() -> usize {
    // SAFETY: no memory access.
    unsafe { libc::sched_getcpu() }.max(0) as usize
}

/// Anonymous memory, populated up front in one system call (a guest page fault costs
/// milliseconds here). Never unmapped: a workload's buffer lives until the guest stops.
pub fn populated_words(words: usize) -> Result<&'static mut [u64]> {
    // SAFETY: a fresh anonymous private mapping; the result is checked.
    let ptr = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            words * 8,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(errno());
    }
    // SAFETY: the mapping is `words` u64s, zeroed, exclusively ours and never unmapped.
    Ok(unsafe { core::slice::from_raw_parts_mut(ptr.cast(), words) })
}

#[repr(C, align(4096))]
struct Page([u8; 4096]);

/// A zeroed buffer aligned for O_DIRECT.
pub struct AlignedBuf(alloc::boxed::Box<[Page]>);

impl AlignedBuf {
    /// At least `len` bytes, rounded up to whole pages.
    pub fn new(len: usize) -> AlignedBuf {
        AlignedBuf((0..len.div_ceil(4096)).map(|_| Page([0; 4096])).collect())
    }
}

impl core::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `Page` is a byte array without padding; the pages are contiguous.
        unsafe { core::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * 4096) }
    }
}

impl core::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, borrowed mutably.
        unsafe { core::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * 4096) }
    }
}

/// Resets (`reboot=k` makes the kernel use the i8042 reset line) or halts the guest.
pub fn reboot(power_off: bool) {
    // SAFETY: no memory access.
    unsafe { libc::sync() };
    let cmd = if power_off {
        libc::RB_POWER_OFF
    } else {
        libc::RB_AUTOBOOT
    };
    // SAFETY: no memory access; returns only on failure.
    unsafe { libc::reboot(cmd) };
}
