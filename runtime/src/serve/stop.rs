//! Stopping `quill serve` on SIGTERM (systemd's stop, `kill`) or SIGINT: the signal handler only
//! records the signal and wakes the serve loop; the loop cancels the generation in flight at its
//! next token, tells the peer, and returns, so the process exits with status 0 and the line is
//! released within a second.
//!
//! The wake-up is a self-pipe: the handler writes a byte into it, and every `poll(2)` of
//! [`super::port::FdPort`] watches its read end along with the line, so a read that is already
//! waiting returns at once (an atomic flag alone could be set just before `poll` starts and then
//! be missed until the next byte arrives). The handler is installed without `SA_RESTART`, so
//! blocking calls return `EINTR` as well.
//!
//! Only `quill serve` installs it (after its model is loaded; a signal during the load ends the
//! process the default way): `quill generate` and `quill chat` keep the default actions.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);
/// The signal that asked to stop (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// The self-pipe's ends (-1 until [`install`]).
static WAKE_READ: AtomicI32 = AtomicI32::new(-1);
static WAKE_WRITE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe work here: atomics and write(2).
    SIGNAL.store(sig, Ordering::SeqCst);
    REQUESTED.store(true, Ordering::SeqCst);
    let fd = WAKE_WRITE.load(Ordering::SeqCst);
    if fd >= 0 {
        let b = 1u8;
        // SAFETY: one byte from a valid buffer; a full pipe (EAGAIN) is fine, it is readable.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

/// Installs the handler for SIGTERM and SIGINT (once; later calls do nothing).
pub fn install() -> io::Result<()> {
    if WAKE_READ.load(Ordering::SeqCst) >= 0 {
        return Ok(());
    }
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: a two-element array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    WAKE_READ.store(fds[0], Ordering::SeqCst);
    WAKE_WRITE.store(fds[1], Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: sigaction is plain data; the handler only touches atomics and write(2).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            // No SA_RESTART: a blocking poll or write returns EINTR.
            sa.sa_flags = 0;
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// True once a stop signal arrived.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// The signal's name, for the log.
pub fn signal_name() -> &'static str {
    match SIGNAL.load(Ordering::SeqCst) {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "a stop request",
    }
}

/// The read end of the self-pipe, to poll along with a line (`None` before [`install`]).
pub(crate) fn wake_fd() -> Option<RawFd> {
    let fd = WAKE_READ.load(Ordering::SeqCst);
    (fd >= 0).then_some(fd)
}
