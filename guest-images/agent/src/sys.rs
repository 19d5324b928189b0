//! Thin wrappers over the system calls the agent needs. Every guest system call costs
//! milliseconds on the emulating host, so callers batch their work.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Mounts `fstype` at `target`; an already mounted target is fine.
pub fn mount(fstype: &str, target: &str) -> io::Result<()> {
    let src = CString::new(fstype).unwrap();
    let dst = CString::new(target).unwrap();
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let ret = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    match check(ret) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        other => other,
    }
}

/// Puts a serial line in raw mode: no echo, no line editing, no CR/LF translation.
pub fn set_raw(tty: &File) -> io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it in before it is used.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open for the lifetime of `tty`, `t` is a valid termios.
    check(unsafe { libc::tcgetattr(tty.as_raw_fd(), &mut t) })?;
    // SAFETY: `t` is a valid termios.
    unsafe { libc::cfmakeraw(&mut t) };
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    // SAFETY: as above.
    check(unsafe { libc::tcsetattr(tty.as_raw_fd(), libc::TCSANOW, &t) })
}

/// The TSC, read without serialisation (a gap measurement, not a benchmark).
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects and is available on every x86_64 CPU.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Reads a clock in nanoseconds.
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    // SAFETY: timespec is plain data filled in by the call.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is valid for writes.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t and cpu < CPU_SETSIZE is checked by the caller's count.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pointer and size describe `set`.
    check(unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) })
}

/// The CPU the calling thread runs on.
pub fn current_cpu() -> usize {
    // SAFETY: no arguments, no memory access.
    let cpu = unsafe { libc::sched_getcpu() };
    cpu.max(0) as usize
}

/// Online CPUs.
pub fn cpu_count() -> usize {
    // SAFETY: no memory access.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    n.max(1) as usize
}

/// Anonymous memory, populated up front in one system call (a guest page fault costs
/// milliseconds here), freed on drop.
pub struct Region {
    ptr: *mut u64,
    words: usize,
}

// SAFETY: the region is plain memory; threads share it only through disjoint slices.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// Maps and populates `bytes` of zeroed memory.
    pub fn populated(bytes: usize) -> io::Result<Region> {
        // SAFETY: a fresh anonymous private mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Region {
            ptr: ptr.cast(),
            words: bytes / 8,
        })
    }

    /// The words in `range`. Callers hand out disjoint ranges, one per thread.
    ///
    /// # Safety
    /// No two live slices may overlap.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, range: std::ops::Range<usize>) -> &mut [u64] {
        assert!(range.start <= range.end && range.end <= self.words);
        // SAFETY: in bounds (checked above); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }

    /// Length in words.
    pub fn words(&self) -> usize {
        self.words
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: ptr/len are the mapping made in `populated`.
        unsafe { libc::munmap(self.ptr.cast(), self.words * 8) };
    }
}

/// A buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: owned plain memory.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    const ALIGN: usize = 4096;

    /// A zeroed buffer of `len` bytes aligned to 4 KiB.
    pub fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, Self::ALIGN).unwrap();
        // SAFETY: len > 0 is required by callers (record batches are never empty).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        AlignedBuf { ptr, len }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr/len describe our allocation.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr/len describe our allocation, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, Self::ALIGN).unwrap();
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// Size of a block device in bytes.
pub fn block_device_size(dev: &File) -> io::Result<u64> {
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    check(unsafe { libc::ioctl(dev.as_raw_fd(), BLKGETSIZE64, &mut size) })?;
    Ok(size)
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
