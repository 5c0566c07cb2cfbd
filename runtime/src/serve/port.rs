//! Serial ports on Linux, behind the `embedded-io` traits the console is written against: a
//! UART or USB-serial adapter (termios: raw, 8N1, optional RTS/CTS), a pseudo-terminal quill
//! creates, and stdio.
//!
//! Every port is a file descriptor read and written through `poll(2)`, so that the console can
//! ask whether input is waiting (to see Ctrl-C or a Cancel during a generation), writes block
//! while the line is slower than the model (nothing is dropped at 9600 baud) but not forever, and
//! a peer that goes away (the PTY's other end closed, the USB adapter unplugged) is reported as
//! [`ErrorKind::NotConnected`] instead of hanging.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use embedded_io::ErrorKind;

/// A port's failure, with the kind the console acts on.
#[derive(Debug)]
pub struct PortError {
    pub kind: ErrorKind,
    pub source: io::Error,
}

impl std::fmt::Display for PortError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            ErrorKind::NotConnected => write!(f, "the peer went away ({})", self.source),
            ErrorKind::TimedOut => write!(f, "the line made no progress within the timeout"),
            _ => write!(f, "{}", self.source),
        }
    }
}

impl std::error::Error for PortError {}

impl embedded_io::Error for PortError {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
}

fn gone(source: io::Error) -> PortError {
    PortError {
        kind: ErrorKind::NotConnected,
        source,
    }
}

fn other(source: io::Error) -> PortError {
    if source.kind() == io::ErrorKind::Interrupted {
        return PortError {
            kind: ErrorKind::Interrupted,
            source,
        };
    }
    let kind = match source.raw_os_error() {
        // The device or the PTY's other end is gone.
        Some(libc::EIO | libc::ENXIO | libc::ENODEV | libc::EPIPE) => ErrorKind::NotConnected,
        _ => ErrorKind::Other,
    };
    PortError { kind, source }
}

/// What kind of line a [`FdPort`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A serial device opened by path.
    Serial {
        path: PathBuf,
        baud: u32,
        rtscts: bool,
    },
    /// The controlling side of a pseudo-terminal; people and tests open `slave`.
    Pty { slave: PathBuf },
    /// Standard input and output.
    Stdio,
}

/// A port over file descriptors (one for both directions, or stdin and stdout).
#[derive(Debug)]
pub struct FdPort {
    read_fd: OwnedFd,
    /// `None`: writes go to `read_fd` too.
    write_fd: Option<OwnedFd>,
    pub line: Line,
    /// Longest a write may wait for the line (`None`: forever).
    write_timeout: Option<Duration>,
    /// Longest a read may wait for a byte (`None`: forever).
    read_timeout: Option<Duration>,
}

/// Why a wait ended early: `quill serve` was asked to stop (see [`super::stop`]).
fn stopping() -> io::Error {
    io::Error::new(
        io::ErrorKind::Interrupted,
        format!("stopping on {}", super::stop::signal_name()),
    )
}

/// Polls one descriptor. With `wake`, the wait also ends (with [`stopping`]) when a stop signal
/// arrives; without it (the zero-timeout checks between tokens) a stop is left to the caller.
fn poll_fd(
    fd: RawFd,
    events: libc::c_short,
    timeout: Option<Duration>,
    wake: bool,
) -> io::Result<libc::c_short> {
    let wake_fd = if wake { super::stop::wake_fd() } else { None };
    if wake_fd.is_some() && super::stop::requested() {
        return Err(stopping());
    }
    let mut p = [
        libc::pollfd {
            fd,
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: wake_fd.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let n = if wake_fd.is_some() { 2 } else { 1 };
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: `n` valid pollfds.
        let r = unsafe { libc::poll(p.as_mut_ptr(), n, ms) };
        if wake_fd.is_some() && super::stop::requested() {
            return Err(stopping());
        }
        if r >= 0 {
            return Ok(p[0].revents);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

const BAUDS: [(u32, libc::speed_t); 18] = [
    (1200, libc::B1200),
    (2400, libc::B2400),
    (4800, libc::B4800),
    (9600, libc::B9600),
    (19200, libc::B19200),
    (38400, libc::B38400),
    (57600, libc::B57600),
    (115200, libc::B115200),
    (230400, libc::B230400),
    (460800, libc::B460800),
    (500000, libc::B500000),
    (576000, libc::B576000),
    (921600, libc::B921600),
    (1000000, libc::B1000000),
    (1500000, libc::B1500000),
    (2000000, libc::B2000000),
    (3000000, libc::B3000000),
    (4000000, libc::B4000000),
];

/// Puts a terminal in raw mode: no echo, no line editing, no character translation, 8N1.
fn make_raw(fd: RawFd, baud: Option<(u32, bool)>) -> io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and termios pointer.
    check(unsafe { libc::tcgetattr(fd, &mut t) })?;
    // SAFETY: as above.
    unsafe { libc::cfmakeraw(&mut t) };
    t.c_cflag &= !(libc::PARENB | libc::CSTOPB | libc::CSIZE | libc::CRTSCTS);
    t.c_cflag |= libc::CS8 | libc::CLOCAL | libc::CREAD;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    if let Some((baud, rtscts)) = baud {
        let speed = BAUDS
            .iter()
            .find(|(b, _)| *b == baud)
            .map(|(_, s)| *s)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{baud} baud is not a rate the serial driver offers; use one of {}",
                        BAUDS.map(|(b, _)| b.to_string()).join(", ")
                    ),
                )
            })?;
        // SAFETY: valid termios pointer.
        check(unsafe { libc::cfsetispeed(&mut t, speed) })?;
        // SAFETY: as above.
        check(unsafe { libc::cfsetospeed(&mut t, speed) })?;
        if rtscts {
            t.c_cflag |= libc::CRTSCTS;
        }
    }
    // SAFETY: valid fd and termios.
    check(unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) })?;
    Ok(())
}

fn open_fd(path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: a NUL-terminated path.
    let fd = check(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl FdPort {
    /// Opens a serial device: raw 8N1 at `baud`, RTS/CTS flow control if asked, exclusive (a
    /// second quill, or a getty, cannot share the line unnoticed), stale input discarded.
    pub fn open_serial(path: &Path, baud: u32, rtscts: bool) -> io::Result<FdPort> {
        let fd = open_fd(path, libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot open the serial device {}: {e}{}",
                    path.display(),
                    if e.kind() == io::ErrorKind::PermissionDenied {
                        " (add the user to the `dialout` group)"
                    } else {
                        ""
                    }
                ),
            )
        })?;
        // SAFETY: valid fd.
        if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io::Error::other(format!(
                "{} is in use by another program (another quill?); stop it first",
                path.display()
            )));
        }
        make_raw(fd.as_raw_fd(), Some((baud, rtscts))).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{} is not a serial port quill can configure: {e}",
                    path.display()
                ),
            )
        })?;
        // SAFETY: valid fd; drops bytes that arrived before we were listening.
        unsafe { libc::tcflush(fd.as_raw_fd(), libc::TCIFLUSH) };
        Ok(FdPort {
            read_fd: fd,
            write_fd: None,
            line: Line::Serial {
                path: path.to_owned(),
                baud,
                rtscts,
            },
            write_timeout: None,
            read_timeout: None,
        })
    }

    /// Creates a pseudo-terminal in raw mode; people and tests open [`Line::Pty`]'s `slave`.
    ///
    /// `baud` is recorded in the terminal's settings (what a peer's `tcgetattr` reports, as on a
    /// serial line); the kernel does not pace a PTY by it, bytes flow as fast as both sides go.
    pub fn open_pty(baud: Option<u32>) -> io::Result<FdPort> {
        // SAFETY: plain libc calls on the descriptor they return.
        let fd = check(unsafe {
            libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC)
        })?;
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: valid master descriptor.
        check(unsafe { libc::grantpt(fd.as_raw_fd()) })?;
        // SAFETY: as above.
        check(unsafe { libc::unlockpt(fd.as_raw_fd()) })?;
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: the buffer's length is passed.
        let r = unsafe { libc::ptsname_r(fd.as_raw_fd(), name.as_mut_ptr(), name.len()) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        // SAFETY: ptsname_r wrote a NUL-terminated string.
        let slave = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
        let slave = PathBuf::from(slave.to_string_lossy().into_owned());
        // Termios requests on the controlling side apply to the terminal side: raw, so that the
        // kernel neither echoes nor translates what the peer and quill exchange.
        make_raw(fd.as_raw_fd(), baud.map(|b| (b, false)))?;
        // Until the terminal side has been opened once, the kernel does not report it closed:
        // open and close it, so that "no peer" (POLLHUP) holds until someone opens it.
        drop(open_fd(&slave, libc::O_RDWR | libc::O_NOCTTY)?);
        Ok(FdPort {
            read_fd: fd,
            write_fd: None,
            line: Line::Pty { slave },
            write_timeout: None,
            read_timeout: None,
        })
    }

    /// Standard input and output (left blocking: they are shared with the parent).
    pub fn stdio() -> io::Result<FdPort> {
        // SAFETY: duplicates of our own standard descriptors.
        let (i, o) = unsafe { (check(libc::dup(0))?, check(libc::dup(1))?) };
        // SAFETY: fresh descriptors we own.
        let (i, o) = unsafe { (OwnedFd::from_raw_fd(i), OwnedFd::from_raw_fd(o)) };
        Ok(FdPort {
            read_fd: i,
            write_fd: Some(o),
            line: Line::Stdio,
            write_timeout: None,
            read_timeout: None,
        })
    }

    pub fn set_write_timeout(&mut self, t: Option<Duration>) {
        self.write_timeout = t;
    }

    pub fn set_read_timeout(&mut self, t: Option<Duration>) {
        self.read_timeout = t;
    }

    fn wfd(&self) -> RawFd {
        self.write_fd.as_ref().unwrap_or(&self.read_fd).as_raw_fd()
    }

    /// True when the far side of the line is there: for a PTY, someone has the terminal side
    /// open; other lines cannot tell and always say yes.
    pub fn peer_present(&self) -> bool {
        match self.line {
            Line::Pty { .. } => poll_fd(
                self.read_fd.as_raw_fd(),
                libc::POLLIN,
                Some(Duration::ZERO),
                false,
            )
            .map(|r| r & libc::POLLHUP == 0)
            .unwrap_or(false),
            _ => true,
        }
    }

    /// Drops output the previous peer left unread. Input is kept: a new peer may already have
    /// opened the line and sent its first request before the server saw the old one go.
    pub fn discard_pending(&self) {
        // SAFETY: valid fd.
        unsafe { libc::tcflush(self.read_fd.as_raw_fd(), libc::TCOFLUSH) };
    }

    /// Waits until a peer is there (see [`FdPort::peer_present`]); false when a stop signal
    /// arrived first.
    pub fn wait_for_peer(&self) -> bool {
        while !self.peer_present() {
            if super::stop::requested() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        !super::stop::requested()
    }

    /// Gives the line up to `limit` to send what is queued, then drops the rest: closing a
    /// serial device waits until its output has drained (up to 30 s by default, forever behind
    /// RTS/CTS with a stalled peer), which must not hold up a stop. (Closing a PTY or stdio does
    /// not wait: nothing to do there.)
    pub fn drop_unsent(&self, limit: Duration) {
        if !matches!(self.line, Line::Serial { .. }) {
            return;
        }
        let fd = self.wfd();
        let t0 = Instant::now();
        loop {
            let mut queued: libc::c_int = 0;
            // SAFETY: TIOCOUTQ writes one int.
            let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
            if r != 0 || queued == 0 || t0.elapsed() >= limit {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: valid fd.
        unsafe { libc::tcflush(fd, libc::TCOFLUSH) };
    }

    /// Writes what the line takes right now, without waiting, and forgets the rest: a last word
    /// to the peer on the way out, which must not hold up a stop.
    pub fn write_now(&mut self, bytes: &[u8]) {
        if self.line == Line::Stdio {
            // Standard output is blocking: it could wait on a stalled reader.
            return;
        }
        // SAFETY: reads at most bytes.len() bytes from bytes; serial lines and PTYs are
        // opened non-blocking.
        unsafe { libc::write(self.wfd(), bytes.as_ptr().cast(), bytes.len()) };
    }
}

impl embedded_io::ErrorType for FdPort {
    type Error = PortError;
}

impl embedded_io::ReadReady for FdPort {
    fn read_ready(&mut self) -> Result<bool, PortError> {
        let r = poll_fd(
            self.read_fd.as_raw_fd(),
            libc::POLLIN,
            Some(Duration::ZERO),
            false,
        )
        .map_err(other)?;
        if r & libc::POLLIN != 0 {
            return Ok(true);
        }
        if r & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            // The end of stdin is not a peer going away: what was sent is still answered, and
            // the next read reports the end.
            if self.line == Line::Stdio {
                return Ok(false);
            }
            return Err(gone(io::Error::from_raw_os_error(libc::EIO)));
        }
        Ok(false)
    }
}

impl embedded_io::Read for FdPort {
    /// Blocks until at least one byte arrives; `Ok(0)` is the end of input (stdin closed).
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, PortError> {
        if buf.is_empty() {
            return Ok(0);
        }
        let fd = self.read_fd.as_raw_fd();
        loop {
            let r = poll_fd(fd, libc::POLLIN, self.read_timeout, true).map_err(other)?;
            if r == 0 {
                return Err(PortError {
                    kind: ErrorKind::TimedOut,
                    source: io::Error::from(io::ErrorKind::TimedOut),
                });
            }
            if r & libc::POLLIN == 0 && r & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                if self.line == Line::Stdio {
                    return Ok(0);
                }
                return Err(gone(io::Error::from_raw_os_error(libc::EIO)));
            }
            // SAFETY: writes at most buf.len() bytes into buf.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                return Ok(n as usize);
            }
            if n == 0 {
                return match self.line {
                    Line::Stdio => Ok(0),
                    // A tty that reads nothing after poll said "ready" has lost its device.
                    _ => Err(gone(io::Error::from_raw_os_error(libc::ENODEV))),
                };
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => continue,
                _ => return Err(other(e)),
            }
        }
    }
}

impl embedded_io::Write for FdPort {
    /// Blocks until the line takes at least one byte, up to the write timeout.
    fn write(&mut self, buf: &[u8]) -> Result<usize, PortError> {
        if buf.is_empty() {
            return Ok(0);
        }
        let fd = self.wfd();
        let deadline = self.write_timeout.map(|t| Instant::now() + t);
        loop {
            // SAFETY: reads at most buf.len() bytes from buf.
            let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
            if n > 0 {
                return Ok(n as usize);
            }
            let e = if n == 0 {
                io::Error::from_raw_os_error(libc::EAGAIN)
            } else {
                io::Error::last_os_error()
            };
            match e.kind() {
                io::ErrorKind::WouldBlock => {
                    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                    if left == Some(Duration::ZERO) {
                        return Err(PortError {
                            kind: ErrorKind::TimedOut,
                            source: e,
                        });
                    }
                    // Wake up now and then to notice a peer that went away.
                    let wait = left.map_or(Duration::from_millis(200), |l| {
                        l.min(Duration::from_millis(200))
                    });
                    let r = poll_fd(fd, libc::POLLOUT, Some(wait), true).map_err(other)?;
                    if r & (libc::POLLHUP | libc::POLLERR) != 0 && r & libc::POLLOUT == 0 {
                        return Err(gone(e));
                    }
                }
                io::ErrorKind::Interrupted if super::stop::requested() => {
                    return Err(other(stopping()));
                }
                io::ErrorKind::Interrupted => {}
                _ => return Err(other(e)),
            }
        }
    }

    fn flush(&mut self) -> Result<(), PortError> {
        Ok(())
    }
}
