//! The little runtime a no_std init needs: an allocator over libc's malloc, a panic handler,
//! threads, a lock and console output.

use alloc::boxed::Box;
use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

struct Malloc;

// SAFETY: posix_memalign/free are a correct allocator for any size and power-of-two alignment.
unsafe impl GlobalAlloc for Malloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let mut p = core::ptr::null_mut();
        let align = layout.align().max(core::mem::size_of::<usize>());
        // SAFETY: `p` is valid for writes; align is a power of two multiple of sizeof(void*).
        if unsafe { libc::posix_memalign(&mut p, align, layout.size()) } != 0 {
            return core::ptr::null_mut();
        }
        p.cast()
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from posix_memalign above.
        unsafe { libc::free(ptr.cast()) }
    }
}

#[global_allocator]
static ALLOCATOR: Malloc = Malloc;

/// Writes to the kernel console (init's stderr).
pub fn eprint(text: &str) {
    // SAFETY: the pointer/length describe `text`.
    unsafe { libc::write(2, text.as_ptr().cast(), text.len()) };
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    eprint(&alloc::format!("agent: {info}\n"));
    // As init, exiting panics the kernel (panic=-1 resets the guest): the host sees a reboot.
    // SAFETY: no preconditions.
    unsafe { libc::abort() }
}

/// A joinable thread.
pub struct Thread(libc::pthread_t);

type Task = Box<dyn FnOnce() + Send>;

extern "C" fn trampoline(arg: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: `arg` is the Box<Task> leaked by `spawn`, taken back exactly once.
    let task = unsafe { Box::from_raw(arg.cast::<Task>()) };
    task();
    core::ptr::null_mut()
}

/// Starts `f` on a new thread.
pub fn spawn(f: impl FnOnce() + Send + 'static) -> Thread {
    let task: Box<Task> = Box::new(Box::new(f));
    let arg = Box::into_raw(task).cast::<libc::c_void>();
    // SAFETY: pthread_t is plain data that pthread_create fills in.
    let mut tid: libc::pthread_t = unsafe { core::mem::zeroed() };
    // SAFETY: `tid` is valid for writes; `trampoline` takes ownership of `arg`.
    let ret = unsafe { libc::pthread_create(&mut tid, core::ptr::null(), trampoline, arg) };
    assert!(ret == 0, "pthread_create failed: {ret}");
    Thread(tid)
}

impl Thread {
    /// Waits for the thread to finish.
    pub fn join(self) {
        // SAFETY: the thread was created joinable and is joined once.
        unsafe { libc::pthread_join(self.0, core::ptr::null_mut()) };
    }
}

/// A spin lock for data touched a few hundred times a second with almost no contention (a
/// futex-based lock would cost a system call, milliseconds here, when it does contend).
pub struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: access to `value` is serialised by `locked`.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    /// A new unlocked lock.
    pub const fn new(value: T) -> Self {
        SpinLock {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Runs `f` with the value locked.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut spins = 0u32;
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins += 1;
            if spins.is_multiple_of(1024) {
                // The holder may be preempted on this same CPU: let it run.
                // SAFETY: no preconditions.
                unsafe { libc::sched_yield() };
            } else {
                core::hint::spin_loop();
            }
        }
        // SAFETY: we hold the lock.
        let r = f(unsafe { &mut *self.value.get() });
        self.locked.store(false, Ordering::Release);
        r
    }
}

/// The precompiled `alloc` crate keeps unwinding landing pads that name this symbol. With
/// panic=abort nothing ever unwinds, so they never run.
#[no_mangle]
#[allow(non_snake_case)]
extern "C" fn _Unwind_Resume() -> ! {
    // SAFETY: no preconditions.
    unsafe { libc::abort() }
}

/// Named by the same landing pads' unwind tables; never called without unwinding.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
