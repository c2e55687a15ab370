//! A fault-injecting HTTP/1.1 proxy on 127.0.0.1 for the S3 tests: it sits
//! between walvault and s3s-fs and misbehaves as the test switches it, at
//! run time, between [`Fault`]s.
//!
//! Every request gets a connection of its own (the proxy asks both sides
//! for `Connection: close`), so each request meets the fault in force when
//! it arrives. Plain threads, each loop bounded by the stop flag; all of
//! them end when the proxy drops.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How the proxy treats the requests that arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forwards everything unchanged.
    PassThrough,
    /// The store is down: nothing listens on the port (connections are
    /// refused by the kernel).
    Refuse,
    /// Accepts, then resets the connection (RST) before reading a byte.
    ResetAtAccept,
    /// Forwards the request and the response's head, then resets the
    /// connection half-way through a response body.
    ResetMidBody,
    /// Forwards the request and the response's head, then sends half of
    /// the body its Content-Length announces and closes (FIN).
    TruncatedBody,
    /// Answers the next `n` requests with `503 Slow Down` and an S3 error
    /// body, then passes through.
    SlowDown(usize),
    /// Accepts and reads, never answers.
    Stall,
}

/// Responses with a body shorter than this pass unharmed under the body
/// faults: the small ones are not the objects under test.
const BODY_FAULT_MIN: u64 = 64;

struct Shared {
    fault: Mutex<Fault>,
    stop: AtomicBool,
    /// Requests seen (not counting refused connections).
    requests: AtomicUsize,
    /// Faults actually injected (a reset, a truncation, a 503, a stall).
    injected: AtomicUsize,
}

pub struct FaultProxy {
    pub port: u16,
    upstream: u16,
    shared: Arc<Shared>,
    accepter: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// A proxy on a free port of 127.0.0.1 in front of `upstream`
    /// (127.0.0.1 too), passing through.
    pub fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            fault: Mutex::new(Fault::PassThrough),
            stop: AtomicBool::new(false),
            requests: AtomicUsize::new(0),
            injected: AtomicUsize::new(0),
        });
        let s = shared.clone();
        let accepter = std::thread::spawn(move || accept_loop(listener, port, upstream, s));
        FaultProxy {
            port,
            upstream,
            shared,
            accepter: Some(accepter),
        }
    }

    /// Switches the fault; requests arriving from now on meet it (and with
    /// [`Fault::Refuse`], connections soon after: the accepter polls).
    pub fn set(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap() = fault;
        // Let the accepter close or reopen the port before the caller goes on.
        std::thread::sleep(Duration::from_millis(50));
    }

    pub fn fault(&self) -> Fault {
        *self.shared.fault.lock().unwrap()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    pub fn injected(&self) -> usize {
        self.shared.injected.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.accepter.take() {
            let _ = a.join();
        }
    }
}

fn accept_loop(listener: TcpListener, port: u16, upstream: u16, shared: Arc<Shared>) {
    listener.set_nonblocking(true).unwrap();
    let mut listener = Some(listener);
    let mut connections: Vec<JoinHandle<()>> = vec![];
    while !shared.stop.load(Ordering::SeqCst) {
        let fault = *shared.fault.lock().unwrap();
        if fault == Fault::Refuse {
            // Closing the listening socket: connect() now gets ECONNREFUSED.
            listener = None;
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        if listener.is_none() {
            // std sets SO_REUSEADDR: the port comes back despite TIME_WAIT.
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => {
                    l.set_nonblocking(true).unwrap();
                    listener = Some(l);
                }
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            }
        }
        let client = match listener.as_ref().unwrap().accept() {
            Ok((client, _)) => client,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        connections.retain(|c| !c.is_finished());
        let s = shared.clone();
        connections.push(std::thread::spawn(move || {
            let _ = serve(client, upstream, &s);
        }));
    }
    drop(listener);
    for c in connections {
        let _ = c.join();
    }
}

/// Closes `stream` with a reset rather than a FIN (SO_LINGER 0).
fn reset(stream: TcpStream) {
    abort_on_close(&stream);
    drop(stream);
}

/// Makes the socket's last close send a reset rather than a FIN.
fn abort_on_close(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Reads into `buf` until it holds a whole HTTP head; returns the head's
/// length (the rest of `buf` is body already read). None on EOF, error or stop.
fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>, shared: &Shared) -> Option<usize> {
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        if shared.stop.load(Ordering::SeqCst) || buf.len() > 1 << 20 {
            return None;
        }
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if timed_out(&e) => continue,
            Err(_) => return None,
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// `head` without its Connection header and with `Connection: close`.
fn closing(head: &str) -> Vec<u8> {
    let mut out = String::new();
    for line in head.trim_end_matches("\r\n").split("\r\n") {
        let is_connection = line
            .split_once(':')
            .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("connection"));
        if !is_connection {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

/// Copies `from` to `to` until EOF, an error or the stop flag; returns the
/// bytes copied. At most `limit` bytes when given.
fn relay(from: &mut TcpStream, to: &mut TcpStream, limit: Option<u64>, shared: &Shared) -> u64 {
    let mut buf = vec![0u8; 16 << 10];
    let mut sent = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        let room = limit.map_or(buf.len() as u64, |l| (l - sent).min(buf.len() as u64));
        if room == 0 {
            break;
        }
        match from.read(&mut buf[..room as usize]) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                sent += n as u64;
            }
            Err(e) if timed_out(&e) => continue,
            Err(_) => break,
        }
    }
    sent
}

fn serve(mut client: TcpStream, upstream: u16, shared: &Shared) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    let tick = Some(Duration::from_millis(100));
    client.set_read_timeout(tick)?;
    let fault = {
        let mut f = shared.fault.lock().unwrap();
        let now = *f;
        if let Fault::SlowDown(n) = now {
            *f = if n <= 1 {
                Fault::PassThrough
            } else {
                Fault::SlowDown(n - 1)
            };
        }
        now
    };
    if fault == Fault::ResetAtAccept {
        shared.injected.fetch_add(1, Ordering::SeqCst);
        reset(client);
        return Ok(());
    }
    let mut buf = Vec::new();
    let Some(head_len) = read_head(&mut client, &mut buf, shared) else {
        return Ok(());
    };
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let method = head.split(' ').next().unwrap_or("").to_string();
    let request_body: u64 = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    match fault {
        Fault::SlowDown(_) => {
            // Read the whole request first, as a store does, so the client
            // sees the answer rather than a broken pipe.
            let mut left = request_body.saturating_sub((buf.len() - head_len) as u64);
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut sink = [0u8; 16 << 10];
            while left > 0 && Instant::now() < deadline && !shared.stop.load(Ordering::SeqCst) {
                let room = left.min(sink.len() as u64) as usize;
                match client.read(&mut sink[..room]) {
                    Ok(0) => break,
                    Ok(n) => left -= n as u64,
                    Err(e) if timed_out(&e) => continue,
                    Err(_) => break,
                }
            }
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
                        <Message>Please reduce your request rate.</Message>\
                        <RequestId>fault-proxy</RequestId></Error>";
            let response = format!(
                "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{}",
                if method == "HEAD" { 0 } else { body.len() },
                if method == "HEAD" { "" } else { body }
            );
            shared.injected.fetch_add(1, Ordering::SeqCst);
            let _ = client.write_all(response.as_bytes());
            let _ = client.shutdown(Shutdown::Both);
            return Ok(());
        }
        Fault::Stall => {
            shared.injected.fetch_add(1, Ordering::SeqCst);
            let mut sink = [0u8; 16 << 10];
            while !shared.stop.load(Ordering::SeqCst) {
                match client.read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if timed_out(&e) => {}
                    Err(_) => break,
                }
            }
            return Ok(());
        }
        _ => {}
    }

    let mut server = TcpStream::connect(("127.0.0.1", upstream))?;
    server.set_read_timeout(tick)?;
    server.write_all(&closing(&head))?;
    server.write_all(&buf[head_len..])?;
    // The rest of the request goes through as it comes.
    let (mut c_in, mut s_out) = (client.try_clone()?, server.try_clone()?);
    std::thread::scope(|scope| {
        let sender = scope.spawn(move || {
            relay(&mut c_in, &mut s_out, None, shared);
        });
        let mut abort = false;
        let mut rbuf = Vec::new();
        if let Some(rhead_len) = read_head(&mut server, &mut rbuf, shared) {
            let rhead = String::from_utf8_lossy(&rbuf[..rhead_len]).into_owned();
            let status: u16 = rhead
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let length: Option<u64> = header(&rhead, "content-length").and_then(|v| v.parse().ok());
            let body_fault = matches!(fault, Fault::ResetMidBody | Fault::TruncatedBody)
                && method == "GET"
                && (200..300).contains(&status)
                && length.is_some_and(|l| l >= BODY_FAULT_MIN);
            let _ = client.write_all(&closing(&rhead));
            if body_fault {
                let half = length.unwrap() / 2;
                let early = ((rbuf.len() - rhead_len) as u64).min(half) as usize;
                let _ = client.write_all(&rbuf[rhead_len..rhead_len + early]);
                relay(&mut server, &mut client, Some(half - early as u64), shared);
                shared.injected.fetch_add(1, Ordering::SeqCst);
                abort = fault == Fault::ResetMidBody;
            } else {
                let _ = client.write_all(&rbuf[rhead_len..]);
                relay(&mut server, &mut client, None, shared);
            }
        }
        let _ = server.shutdown(Shutdown::Both);
        if abort {
            // Give the half body a moment to leave, then end the request
            // relay without a FIN: the last close below sends the reset.
            std::thread::sleep(Duration::from_millis(20));
            abort_on_close(&client);
            let _ = client.shutdown(Shutdown::Read);
        } else {
            let _ = client.shutdown(Shutdown::Both);
        }
        let _ = sender.join();
    });
    Ok(())
}
