//! `quill serve` over a real pseudo-terminal with the real int8 model: a test plays the person at
//! the terminal (text mode) and the microcontroller (binary mode), including line noise, Ctrl-C,
//! cancels, a peer that vanishes mid-reply, and a soak of many requests.

use std::io::{BufRead, BufReader, Read as _};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quill::serve::port::FdPort;
use quill_protocol::{
    Client, ClientError, ErrorCode, Generate, MAX_FRAME, Request, Response, Sampling, encode,
    truncated,
};
use xtask::export::WeightFormat;

use crate::support::quant_bundle_dir;

/// A `quill serve --pty` process; killed when dropped.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) path: PathBuf,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Server::start_with(quant_bundle_dir(WeightFormat::Int8), extra)
    }

    /// `quill serve --pty --model MODEL --temperature 0 EXTRA…`, once it says it is ready.
    /// `QUILL_BIN` runs another build of quill instead of this one's (a copy that a parallel
    /// build cannot replace during a long soak, say).
    pub(crate) fn start_with(model: &Path, extra: &[&str]) -> Server {
        Server::spawn(model, None, extra)
    }

    /// The same on `--serial DEVICE` (the test holds the device's far end).
    fn start_serial(model: &Path, device: &Path, extra: &[&str]) -> Server {
        Server::spawn(model, Some(device), extra)
    }

    fn spawn(model: &Path, serial: Option<&Path>, extra: &[&str]) -> Server {
        let bin = std::env::var_os("QUILL_BIN")
            .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_quill")), PathBuf::from);
        let mut cmd = Command::new(bin);
        cmd.arg("serve");
        match serial {
            Some(device) => cmd.arg("--serial").arg(device),
            None => cmd.arg("--pty"),
        };
        let mut child = cmd
            .arg("--model")
            .arg(model)
            .args(["--temperature", "0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting quill serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let path = match serial {
            Some(device) => device.to_owned(),
            None => {
                let (tx, rx) = mpsc::channel();
                let out = child.stdout.take().unwrap();
                std::thread::spawn(move || {
                    let mut line = String::new();
                    let _ = BufReader::new(out).read_line(&mut line);
                    let _ = tx.send(line);
                });
                let line = rx
                    .recv_timeout(Duration::from_secs(120))
                    .unwrap_or_default();
                let path = PathBuf::from(line.trim());
                assert!(
                    path.starts_with("/dev/pts"),
                    "quill serve printed {line:?} instead of a PTY path; stderr:\n{}",
                    stderr.lock().unwrap()
                );
                path
            }
        };
        // The model loads after the line is open; wait for "ready".
        let t0 = Instant::now();
        while !stderr.lock().unwrap().contains("ready") {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "quill serve never got ready; stderr:\n{}",
                stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Server {
            child,
            path,
            stderr,
        }
    }

    /// Resident anonymous memory of the server process (heap, stacks, the model's tensors),
    /// kB: where a leak shows. Not all of VmRSS: its file-backed part (the binary's code, mapped
    /// files) comes and goes with the page cache, which the rest of the suite churns through
    /// (a CI run saw VmRSS rise 5 MB over requests that leaked nothing measurable alone).
    pub(crate) fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("RssAnon in /proc/PID/status")
    }

    pub(crate) fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The terminal side of the PTY, raw, as picocom would set it.
struct Term {
    fd: OwnedFd,
    /// Everything received, for failure messages.
    transcript: Vec<u8>,
}

fn open_raw(path: &Path) -> OwnedFd {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; the descriptor is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    assert!(
        fd >= 0,
        "opening {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain termios calls on a valid descriptor.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(fd.as_raw_fd(), &mut t), 0);
        libc::cfmakeraw(&mut t);
        assert_eq!(libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &t), 0);
    }
    fd
}

impl Term {
    fn open(path: &Path) -> Term {
        Term {
            fd: open_raw(path),
            transcript: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            // SAFETY: reads within `rest`.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
            assert!(
                n > 0,
                "writing to the PTY: {}",
                std::io::Error::last_os_error()
            );
            rest = &rest[n as usize..];
        }
    }

    /// Types like a person: one byte at a time.
    fn type_in(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.send(std::slice::from_ref(b));
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Reads whatever arrives within `wait` (at most `limit` bytes per read).
    fn read_some(&mut self, wait: Duration, limit: usize) -> Vec<u8> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, wait.as_millis() as i32) };
        if r <= 0 {
            return Vec::new();
        }
        let mut buf = vec![0u8; limit];
        // SAFETY: writes within buf.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        buf.truncate(n.max(0) as usize);
        self.transcript.extend_from_slice(&buf);
        buf
    }

    /// Reads until `pattern` has arrived; returns everything read by this call.
    fn read_until(&mut self, pattern: &str) -> String {
        let mut got = Vec::new();
        let t0 = Instant::now();
        while !contains(&got, pattern.as_bytes()) {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "waited 60 s for {pattern:?}; the terminal shows:\n{}",
                String::from_utf8_lossy(&self.transcript)
            );
            got.extend(self.read_some(Duration::from_millis(100), 4096));
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Sends a command line and returns the output up to the next prompt.
    fn command(&mut self, line: &str) -> String {
        self.send(line.as_bytes());
        self.send(b"\r");
        self.read_until("\r\n> ")
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The reply in a text-mode transcript: after the echoed Enter, before a notice or the prompt.
fn reply_text(out: &str) -> String {
    let body = out.split_once("\r\n").map_or(out, |(_, b)| b);
    let end = body
        .find("\r\n[")
        .or_else(|| body.rfind("\r\n> "))
        .unwrap_or(body.len());
    body[..end].replace("\r\n", "\n")
}

fn context_in_use(stats: &str) -> usize {
    let at = stats.find("context ").expect("context in /stats") + "context ".len();
    stats[at..].split(' ').next().unwrap().parse().unwrap()
}

fn quill_stdout(args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quill"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_person_chats_over_the_pty_cancels_and_recovers_from_line_noise() {
    let server = Server::start(&["--max-tokens", "16"]);
    let model = quant_bundle_dir(WeightFormat::Int8).to_str().unwrap();
    let mut t = Term::open(&server.path);
    let banner = t.read_until("\r\n> ");
    assert!(banner.contains("teacher-int8 (int8)"), "{banner:?}");

    // Editing: backspace, Ctrl-U; each Enter convention gives one answer and one prompt.
    t.type_in(b"/inxo\x7f\x7ffo\r");
    let info = t.read_until("\r\n> ");
    assert!(
        info.contains("\x08 \x08"),
        "backspace not erased on screen: {info:?}"
    );
    assert!(
        info.contains("model teacher-int8 (int8 weights)"),
        "{info:?}"
    );
    t.type_in(b"some junk\x15/set temperature 0.7\r\n");
    let set = t.read_until("\r\n> ");
    assert!(set.contains("[temperature = 0.7]"), "{set:?}");
    assert!(
        t.read_some(Duration::from_millis(300), 4096).is_empty(),
        "\\r\\n gave two prompts"
    );
    assert!(
        t.command("/set temperature 0")
            .contains("[temperature = 0]")
    );
    assert!(
        t.command("/set temperature hot")
            .contains("temperature takes a number, got `hot`")
    );

    // A message typed byte by byte is echoed as typed and answered as `quill chat` answers it.
    let message = "What is the capital of France?";
    t.type_in(message.as_bytes());
    let echo = t.read_until(message);
    assert_eq!(echo, message, "echo differs from what was typed");
    t.send(b"\r");
    let out = t.read_until("\r\n> ");
    let reply = reply_text(&out);
    let chat = quill_stdout(
        &[
            "chat",
            "--model",
            model,
            "--temperature",
            "0",
            "--max-tokens",
            "16",
        ],
        &format!("{message}\n"),
    );
    assert_eq!(
        reply.trim(),
        chat.trim(),
        "serve and chat disagree; serve sent {out:?}"
    );
    assert!(
        !out.replace("\r\n", "").contains('\n'),
        "a bare \\n reached the terminal: {out:?}"
    );
    let used = context_in_use(&t.command("/stats"));
    assert!(used > 16, "context in use after one turn: {used}");

    // Line noise: bad UTF-8, control bytes, an overlong line. Each gets one line and a prompt,
    // and the conversation is untouched.
    t.send(b"\xff\xfe\xc3\r");
    assert!(t.read_until("\r\n> ").contains("not valid UTF-8"));
    t.send(b"hel\x01\x02lo\r");
    assert!(t.read_until("\r\n> ").contains("control characters"));
    t.send(&[b'x'; 700]);
    t.send(b"\r");
    assert!(t.read_until("\r\n> ").contains("longer than 512 bytes"));
    assert_eq!(
        context_in_use(&t.command("/stats")),
        used,
        "line noise changed the conversation"
    );

    // Ctrl-C in the middle of a long reply stops it at once.
    assert!(
        t.command("/set max_tokens 400")
            .contains("[max_tokens = 400]")
    );
    t.send(b"Write a long story about a dragon who lives in a mountain.\r");
    t.read_until("\r\n");
    let mut streamed = Vec::new();
    while streamed.len() < 80 {
        assert!(
            !contains(&streamed, b"\r\n> "),
            "the reply ended before Ctrl-C: {streamed:?}"
        );
        streamed.extend(t.read_some(Duration::from_millis(100), 16));
    }
    t.send(b"\x03");
    let rest = t.read_until("[stopped]\r\n> ");
    let stats = t.command("/stats");
    assert!(stats.contains("(stopped)"), "{stats:?}");
    let at = stats.find("last reply: ").unwrap() + "last reply: ".len();
    let generated: usize = stats[at..].split(' ').next().unwrap().parse().unwrap();
    assert!(
        generated < 400,
        "Ctrl-C did not stop the reply: {generated} tokens; {rest:?}"
    );

    // The conversation goes on after the cancel, then /reset empties it.
    t.send(b"Thank you.\r");
    let out = t.read_until("\r\n> ");
    assert!(reply_text(&out).trim().len() > 2, "{out:?}");
    assert!(context_in_use(&t.command("/stats")) > used);
    assert!(t.command("/reset").contains("[new conversation]"));
    assert_eq!(context_in_use(&t.command("/stats")), 0);

    // The terminal goes away mid-reply; the server cancels, waits, and greets the next one.
    t.send(b"Tell me about the history of Rome in detail.\r");
    t.read_until("\r\n");
    t.read_some(Duration::from_millis(300), 64);
    drop(t);
    // A person takes a moment to reconnect (an instant reopen would hide the hang-up).
    std::thread::sleep(Duration::from_millis(500));
    let mut t = Term::open(&server.path);
    assert!(t.read_until("\r\n> ").contains("/help for commands"));
    let stats = t.command("/stats");
    assert!(
        stats.contains("(stopped)"),
        "the vanished peer's reply was not cancelled: {stats:?}"
    );
    assert!(
        server.log().contains("the peer went away"),
        "{}",
        server.log()
    );

    // A slow reader gets every byte: the same reply read 8 bytes at a time.
    t.command("/reset");
    t.command("/set max_tokens 48");
    t.send(b"Name three colours.\r");
    let fast = t.read_until("\r\n> ");
    t.command("/reset");
    t.send(b"Name three colours.\r");
    let mut slow = Vec::new();
    while !contains(&slow, b"\r\n> ") {
        slow.extend(t.read_some(Duration::from_millis(100), 8));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(String::from_utf8_lossy(&slow), fast);
}

/// A binary-mode client on the server's PTY.
fn client(path: &Path) -> Client<FdPort> {
    let mut port = FdPort::open_serial(path, 115200, false).expect("opening the PTY");
    port.set_read_timeout(Some(Duration::from_secs(60)));
    Client::new(port)
}

fn request(id: u16, prompt: &str, chat: bool, max_tokens: u16) -> Generate {
    Generate {
        id,
        prompt: truncated(prompt),
        chat,
        sampling: Sampling {
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ..Sampling::default()
        },
    }
}

fn frame(r: &Request) -> Vec<u8> {
    let mut buf = [0u8; MAX_FRAME];
    encode(r, &mut buf).unwrap().to_vec()
}

fn write_raw(c: &mut Client<FdPort>, bytes: &[u8]) {
    embedded_io::Write::write_all(c.port(), bytes).unwrap();
}

/// Responses up to and including the first that `last` accepts.
fn recv_until(c: &mut Client<FdPort>, last: impl Fn(&Response) -> bool) -> Vec<Response> {
    let mut got = Vec::new();
    loop {
        let r = c.recv().expect("a response");
        let end = last(&r);
        got.push(r);
        if end {
            return got;
        }
    }
}

fn error_code(r: &Response) -> Option<ErrorCode> {
    match r {
        Response::Error(e) => Some(e.code),
        _ => None,
    }
}

#[test]
fn a_microcontroller_speaks_the_binary_protocol() {
    let led = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-led");
    std::fs::write(&led, "x").unwrap();
    let server = Server::start(&["--mode", "binary", "--status-led", led.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(&led).unwrap(),
        "0",
        "the LED starts off"
    );
    let model = quant_bundle_dir(WeightFormat::Int8).to_str().unwrap();
    let mut c = client(&server.path);
    c.ping(42).unwrap();
    let info = c.info().unwrap();
    assert_eq!(info.model, "teacher-int8");
    assert_eq!(info.protocol, quill_protocol::PROTOCOL_VERSION);

    // Plain completion, the same text as `quill generate`; the LED is on while it runs.
    let prompt = "The capital of France is";
    let mut text = String::new();
    let mut led_during = String::new();
    let done = c
        .generate(request(1, prompt, false, 12), |t| {
            text.push_str(t);
            if led_during.is_empty() {
                led_during = std::fs::read_to_string(&led).unwrap();
            }
            true
        })
        .unwrap();
    assert_eq!(led_during, "1", "the LED is not on during generation");
    assert_eq!(std::fs::read_to_string(&led).unwrap(), "0");
    assert_eq!(done.generated_tokens, 12);
    let expected = quill_stdout(
        &[
            "generate",
            "--model",
            model,
            "--temperature",
            "0",
            "--max-tokens",
            "12",
            prompt,
        ],
        "",
    );
    assert_eq!(text.trim_end(), expected.trim_end());

    // A request split at every byte boundary is understood every time.
    let whole = frame(&Request::Generate(request(2, "Hello", false, 1)));
    for cut in 1..whole.len() {
        write_raw(&mut c, &whole[..cut]);
        std::thread::sleep(Duration::from_millis(2));
        write_raw(&mut c, &whole[cut..]);
        let got = recv_until(&mut c, |r| {
            matches!(r, Response::Done(_) | Response::Error(_))
        });
        assert!(
            matches!(got.last(), Some(Response::Done(d)) if d.id == 2 && d.generated_tokens == 1),
            "split at {cut}: {got:?}"
        );
    }

    // Damaged frames get an error naming what was wrong, and the server keeps serving.
    let mut bad = frame(&Request::Info);
    bad[2] ^= 0x04;
    write_raw(&mut c, &bad);
    assert_eq!(
        error_code(&c.recv().unwrap()),
        Some(ErrorCode::CorruptFrame)
    );
    write_raw(&mut c, &[0x55; 3000]);
    write_raw(&mut c, &[0]);
    assert_eq!(error_code(&c.recv().unwrap()), Some(ErrorCode::Oversized));
    let mut unknown = [0u8; MAX_FRAME];
    write_raw(&mut c, encode(&(17u8, 0u8), &mut unknown).unwrap());
    assert_eq!(
        error_code(&c.recv().unwrap()),
        Some(ErrorCode::UnknownMessage)
    );
    let mut malformed = [0u8; MAX_FRAME];
    write_raw(&mut c, encode(&(2u8, 200u8), &mut malformed).unwrap());
    assert_eq!(error_code(&c.recv().unwrap()), Some(ErrorCode::Malformed));
    // Fuzzed frames: random bytes cut by zeros. Every answer is an error frame, then a ping works.
    let mut s = 0x1234_5678_9abc_def1u64;
    let mut fuzz = Vec::new();
    for _ in 0..20_000 {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        fuzz.push(if s.is_multiple_of(97) {
            0
        } else {
            (s >> 40) as u8
        });
    }
    fuzz.push(0);
    write_raw(&mut c, &fuzz);
    write_raw(&mut c, &frame(&Request::Ping { nonce: 7 }));
    let got = recv_until(&mut c, |r| *r == Response::Pong { nonce: 7 });
    assert!(
        got.len() > 100,
        "only {} answers to the fuzzed frames",
        got.len()
    );
    assert!(
        got[..got.len() - 1].iter().all(|r| error_code(r).is_some()),
        "{got:?}"
    );

    // While a generation runs: a ping is answered, another request is refused, a cancel stops it.
    c.send(&Request::Generate(request(
        3,
        "Once upon a time",
        false,
        400,
    )))
    .unwrap();
    let mut tokens = 0;
    while tokens < 3 {
        if let Response::Token { .. } = c.recv().unwrap() {
            tokens += 1;
        }
    }
    c.send(&Request::Ping { nonce: 9 }).unwrap();
    c.send(&Request::Generate(request(4, "Hi", false, 4)))
        .unwrap();
    c.send(&Request::Cancel { id: 3 }).unwrap();
    let got = recv_until(&mut c, |r| matches!(r, Response::Done(_)));
    assert!(got.contains(&Response::Pong { nonce: 9 }), "{got:?}");
    assert!(
        got.iter().any(
            |r| matches!(r, Response::Error(e) if e.id == Some(4) && e.code == ErrorCode::Busy)
        )
    );
    let Some(Response::Done(d)) = got.last() else {
        unreachable!()
    };
    assert_eq!(d.finish, quill_protocol::Finish::Cancelled);
    assert!(d.generated_tokens < 400);

    // Refusals carry the reason: an empty prompt, a bad option.
    let err = c.generate(request(5, "", false, 4), |_| true).unwrap_err();
    assert!(
        matches!(err, ClientError::Server(ref e) if e.code == ErrorCode::EmptyPrompt),
        "{err:?}"
    );
    let mut hot = request(6, "Hi", false, 4);
    hot.sampling.top_p = Some(3.0);
    let err = c.generate(hot, |_| true).unwrap_err();
    assert!(
        matches!(err, ClientError::Server(ref e) if e.code == ErrorCode::BadOption),
        "{err:?}"
    );

    // The client vanishes mid-generation: the server cancels and serves the next client at once.
    c.send(&Request::Generate(request(
        7,
        "The history of the world",
        false,
        4000,
    )))
    .unwrap();
    while !matches!(c.recv().unwrap(), Response::Token { .. }) {}
    drop(c);
    std::thread::sleep(Duration::from_millis(500));
    let mut c = client(&server.path);
    let info = c
        .info()
        .expect("the server is still busy with the vanished client's request");
    assert!(info.context_used < 100, "{info:?}");
    assert!(server.log().contains("the peer went away"));
    drop(c);

    // The host-side example client.
    let out = quill_stdout(
        &[
            "client",
            "--serial",
            server.path.to_str().unwrap(),
            "--ping",
            "--info",
            "--temperature",
            "0",
            "--max-tokens",
            "12",
            prompt,
        ],
        "",
    );
    assert!(out.contains("pong in"), "{out}");
    assert!(out.contains("teacher-int8 (int8 weights)"), "{out}");
    assert!(out.contains(expected.trim_end()), "{out}");
}

#[test]
fn many_requests_in_a_row_do_not_grow_the_server() {
    let server = Server::start(&["--mode", "binary"]);
    let mut c = client(&server.path);
    let prompts = [
        "Hello",
        "The sky is",
        "One, two,",
        "Dear friend,",
        "In the beginning",
    ];
    let run = |n: usize, c: &mut Client<FdPort>| {
        for i in 0..n {
            let chat = i % 4 == 0;
            if chat && i % 20 == 0 {
                c.send(&Request::Reset).unwrap();
                assert_eq!(c.recv().unwrap(), Response::ResetDone);
            }
            let done = c
                .generate(
                    request(i as u16, prompts[i % prompts.len()], chat, 3),
                    |_| true,
                )
                .unwrap();
            assert!(done.generated_tokens >= 1);
            c.ping(i as u32).unwrap();
        }
    };
    run(60, &mut c);
    let before = server.rss_kb();
    run(240, &mut c);
    let after = server.rss_kb();
    eprintln!("server anonymous RSS after 60 requests {before} kB, after 300 {after} kB");
    assert!(
        after < before + 4096,
        "the server grew by {} kB over 240 requests ({before} → {after} kB)",
        after - before
    );
}

#[test]
fn serve_opens_serial_devices_and_stdio_and_names_bad_ones() {
    let model = quant_bundle_dir(WeightFormat::Int8).to_str().unwrap();
    // A wrong device or speed fails at once, saying what to do.
    let out = Command::new(env!("CARGO_BIN_EXE_quill"))
        .args(["serve", "--model", model, "--serial", "/dev/ttyNOPE0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot open the serial device /dev/ttyNOPE0")
    );
    let out = Command::new(env!("CARGO_BIN_EXE_quill"))
        .args([
            "serve",
            "--model",
            model,
            "--serial",
            "/dev/ptmx",
            "--baud",
            "12345",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("12345 baud is not a rate") && err.contains("115200"),
        "{err}"
    );

    // --serial on a terminal the test controls (the far end of a PTY pair), at 9600 baud.
    // SAFETY: plain libc calls; the descriptor is owned below.
    let master = unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(fd >= 0);
        assert_eq!(libc::grantpt(fd), 0);
        assert_eq!(libc::unlockpt(fd), 0);
        OwnedFd::from_raw_fd(fd)
    };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: the buffer's length is passed.
    assert_eq!(
        unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) },
        0
    );
    // SAFETY: NUL-terminated by ptsname_r.
    let slave = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_str()
        .unwrap()
        .to_owned();
    let mut child = Command::new(env!("CARGO_BIN_EXE_quill"))
        .args([
            "serve",
            "--model",
            model,
            "--serial",
            &slave,
            "--baud",
            "9600",
            "--temperature",
            "0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut t = Term {
        fd: master,
        transcript: Vec::new(),
    };
    // The banner went out while nobody was reading; Enter on an empty line gives a prompt.
    t.read_until("\r\n> ");
    let info = t.command("/info");
    assert!(info.contains("model teacher-int8"), "{info:?}");
    let _ = child.kill();
    let _ = child.wait();

    // --stdio: the same console on standard input and output, ending with the input.
    let out = quill_stdout(
        &[
            "serve",
            "--stdio",
            "--model",
            model,
            "--temperature",
            "0",
            "--max-tokens",
            "5",
        ],
        "/info\nThe capital of France is\n",
    );
    assert!(out.contains("model teacher-int8"), "{out:?}");
    assert!(out.matches("\r\n> ").count() >= 3, "{out:?}");
}

/// Waits up to `limit` for the server to exit; returns its status and how long it took.
fn wait_exit(server: &mut Server, limit: Duration) -> (std::process::ExitStatus, Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return (status, t0.elapsed());
        }
        assert!(
            t0.elapsed() < limit,
            "quill serve still runs {limit:?} after the signal; log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(server: &Server, sig: libc::c_int) {
    // SAFETY: a signal to our own child process.
    assert_eq!(
        unsafe { libc::kill(server.child.id() as libc::pid_t, sig) },
        0
    );
}

#[test]
fn sigterm_during_a_reply_ends_serve_cleanly() {
    // Text mode, in the middle of a long reply.
    let mut server = Server::start(&[]);
    let mut t = Term::open(&server.path);
    t.read_until("\r\n> ");
    t.command("/set max_tokens 4000");
    t.send(b"Write a long story about a dragon who lives in a mountain.\r");
    t.read_until("\r\n");
    let mut streamed = Vec::new();
    while streamed.len() < 40 {
        assert!(!contains(&streamed, b"\r\n> "), "the reply ended early");
        streamed.extend(t.read_some(Duration::from_millis(100), 16));
    }
    signal(&server, libc::SIGTERM);
    // The requirement is one second; five leave room for a loaded machine.
    let (status, took) = wait_exit(&mut server, Duration::from_secs(5));
    eprintln!("SIGTERM mid-reply (text mode): exited in {took:?} with {status}");
    assert!(status.success(), "{status}; log:\n{}", server.log());
    let log = server.log();
    assert!(
        log.contains("stopping on SIGTERM: 1 replies served (1 cancelled); the line is released"),
        "{log}"
    );
    // The line is released: the terminal side sees the hang-up.
    let mut p = libc::pollfd {
        fd: t.fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 1000) };
    assert_ne!(p.revents & libc::POLLHUP, 0, "the PTY is still open");

    // Binary mode, SIGINT in the middle of a generation.
    let mut server = Server::start(&["--mode", "binary"]);
    let mut c = client(&server.path);
    c.send(&Request::Generate(request(
        1,
        "Once upon a time",
        false,
        4000,
    )))
    .unwrap();
    let mut tokens = 0;
    while tokens < 3 {
        if let Response::Token { .. } = c.recv().unwrap() {
            tokens += 1;
        }
    }
    signal(&server, libc::SIGINT);
    let (status, took) = wait_exit(&mut server, Duration::from_secs(5));
    eprintln!("SIGINT mid-generation (binary mode): exited in {took:?} with {status}");
    assert!(status.success(), "{status}; log:\n{}", server.log());
    assert!(
        server.log().contains("stopping on SIGINT"),
        "{}",
        server.log()
    );

    // No peer at all: the server is waiting for someone to open the terminal.
    let mut server = Server::start(&[]);
    signal(&server, libc::SIGTERM);
    let (status, took) = wait_exit(&mut server, Duration::from_secs(5));
    eprintln!("SIGTERM while waiting for a peer: exited in {took:?} with {status}");
    assert!(status.success(), "{status}; log:\n{}", server.log());
    assert!(
        server.log().contains("stopping on SIGTERM: 0 replies"),
        "{}",
        server.log()
    );

    // --serial at 9600 baud with a peer that reads nothing: the reply piles up in the line (the
    // far end of a PTY pair as the device; the two-block model to be quick).
    // SAFETY: plain libc calls; the descriptor is owned below.
    let master = unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(fd >= 0);
        assert_eq!(libc::grantpt(fd), 0);
        assert_eq!(libc::unlockpt(fd), 0);
        OwnedFd::from_raw_fd(fd)
    };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: the buffer's length is passed.
    assert_eq!(
        unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) },
        0
    );
    // SAFETY: NUL-terminated by ptsname_r.
    let device = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_str()
        .unwrap()
        .to_owned();
    let small = crate::support::small_bundle_dir();
    let mut server = Server::start_serial(
        small,
        Path::new(&device),
        &["--baud", "9600", "--max-tokens", "4000"],
    );
    let mut t = Term {
        fd: master,
        transcript: Vec::new(),
    };
    t.send(b"Tell me a long story.\r");
    std::thread::sleep(Duration::from_secs(2));
    signal(&server, libc::SIGTERM);
    let (status, took) = wait_exit(&mut server, Duration::from_secs(5));
    eprintln!("SIGTERM with a stalled reader on --serial: exited in {took:?} with {status}");
    assert!(status.success(), "{status}; log:\n{}", server.log());
    assert!(
        server.log().contains("stopping on SIGTERM"),
        "{}",
        server.log()
    );
}
