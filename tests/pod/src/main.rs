//! A test upstream "pod" for rollsafe's end-to-end tests.
//!
//! Every request it receives is appended to an attempt log; every write it commits (POST, PUT,
//! PATCH, DELETE answered normally) to a ledger. Both are JSON lines files that survive the pod,
//! so a test can count writes across restarts. Like a real app it never executes a request whose
//! body arrived incomplete: that one is logged as `aborted` and nothing else happens. Every
//! answer it finished writing is appended to an answers log (a pod killed between committing
//! and answering leaves a commit with no answer). Control endpoints under `/__pod/` script the
//! next answers: a status N times, a delay, a connection closed before answering. SIGTERM
//! drains (stop accepting, finish in-flight requests with `Connection: close`, close idle
//! keep-alive connections, exit 0); SIGKILL is the hard death, mid-request.
//!
//! Usage: rollsafe-pod --listen 127.0.0.11:18080 --name a1 --group a --dir /tmp/pods
//!        [--work-ms N]   (time a request takes before it commits; default 0)

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// One scripted answer, consumed `count` times (default once) by the next requests.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Act {
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default)]
    body: Option<String>,
    /// Wait this long after reading the request, before answering (a stall).
    #[serde(default)]
    delay_ms: u64,
    /// Close the connection after reading the request, without answering.
    #[serde(default)]
    close: bool,
    /// Reset the connection (RST) after reading the request, without answering.
    #[serde(default)]
    reset: bool,
    /// Commit the write to the ledger even though the answer is scripted.
    #[serde(default)]
    commit: bool,
    #[serde(default = "one")]
    count: u32,
    /// Only requests whose path starts with this consume the act.
    #[serde(default)]
    path_prefix: Option<String>,
}

fn one() -> u32 {
    1
}

struct Pod {
    name: String,
    group: String,
    script: Mutex<VecDeque<Act>>,
    attempts: Mutex<File>,
    ledger: Mutex<File>,
    answers: Mutex<File>,
    work_ms: u64,
    seq: AtomicU64,
    terminating: AtomicBool,
    connections: AtomicUsize,
    /// Requests being worked on (read whole, not yet answered).
    in_flight: AtomicUsize,
    /// The directory every pod of a run shares: logs, ledgers, and the keys being executed.
    dir: PathBuf,
}

struct Req {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn main() {
    let mut listen = String::from("127.0.0.1:0");
    let mut name = String::from("pod");
    let mut group = String::from("default");
    let mut dir = std::env::temp_dir();
    let mut work_ms = 0;
    let mut balance: Option<String> = None;
    let mut backends: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| die(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--listen" => listen = value,
            "--balance" => balance = Some(value),
            "--backends" => backends = value.split(',').map(str::to_string).collect(),
            "--name" => name = value,
            "--group" => group = value,
            "--dir" => dir = PathBuf::from(value),
            "--work-ms" => {
                work_ms = value
                    .parse()
                    .unwrap_or_else(|_| die(&format!("--work-ms: not a number: {value}")))
            }
            _ => die(&format!("unknown flag {flag}")),
        }
    }
    if let Some(addr) = balance {
        return service(&addr, &backends);
    }
    let open = |suffix: &str| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{name}.{suffix}.jsonl")))
            .unwrap_or_else(|e| die(&format!("open {suffix} log: {e}")))
    };
    let pod = Arc::new(Pod {
        attempts: Mutex::new(open("attempts")),
        ledger: Mutex::new(open("ledger")),
        answers: Mutex::new(open("answers")),
        work_ms,
        name,
        group,
        script: Mutex::new(VecDeque::new()),
        seq: AtomicU64::new(0),
        terminating: AtomicBool::new(false),
        connections: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
        dir: dir.clone(),
    });
    let term = Arc::new(AtomicBool::new(false));
    if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&term)) {
        die(&format!("signal handler: {e}"));
    }
    let listener =
        TcpListener::bind(&listen).unwrap_or_else(|e| die(&format!("bind {listen}: {e}")));
    if let Err(e) = listener.set_nonblocking(true) {
        die(&format!("nonblocking: {e}"));
    }
    println!("pod {} listening on {listen}", pod.name);
    let _ = io::stdout().flush();
    while !term.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let pod = Arc::clone(&pod);
                pod.connections.fetch_add(1, Ordering::SeqCst);
                thread::spawn(move || {
                    let _ = serve(&pod, stream);
                    pod.connections.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(2))
            }
            Err(_) => thread::sleep(Duration::from_millis(2)),
        }
    }
    // Drain: no new connections; connections finish the request they are in, then close.
    drop(listener);
    pod.terminating.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pod.connections.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    println!("pod {} drained", pod.name);
}

/// `--balance ADDR --backends A,B`: a Kubernetes Service in front of pods, as kube-proxy makes
/// it — L4, one backend per connection, round robin over the endpoints that accept (a Service
/// drops a pod that stopped being ready or died from its endpoints). When none accepts, the
/// client's connection is reset.
fn service(addr: &str, backends: &[String]) {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| die(&format!("bind {addr}: {e}")));
    println!("service on {addr} -> {}", backends.join(","));
    let _ = io::stdout().flush();
    let next = AtomicUsize::new(0);
    for client in listener.incoming().flatten() {
        let start = next.fetch_add(1, Ordering::SeqCst);
        let order: Vec<String> = (0..backends.len())
            .filter_map(|k| backends.get((start + k) % backends.len()).cloned())
            .collect();
        thread::spawn(
            move || match order.iter().find_map(|b| TcpStream::connect(b).ok()) {
                Some(upstream) => splice(client, upstream),
                None => {
                    let _ = socket_linger_zero(&client);
                }
            },
        );
    }
}

/// Closes with a reset rather than a FIN.
fn socket_linger_zero(stream: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO))
}

/// Copies both ways until each side has closed; a reset on one side resets the other.
fn splice(client: TcpStream, upstream: TcpStream) {
    let pairs = [
        (client.try_clone(), upstream.try_clone()),
        (upstream.try_clone(), client.try_clone()),
    ];
    let mut handles = Vec::new();
    for (from, to) in pairs {
        let (Ok(mut from), Ok(mut to)) = (from, to) else {
            return;
        };
        handles.push(thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => {
                        let _ = to.shutdown(Shutdown::Write);
                        return;
                    }
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            let _ = from.shutdown(Shutdown::Both);
                            return;
                        }
                    }
                    Err(_) => {
                        let _ = socket_linger_zero(&to);
                        let _ = to.shutdown(Shutdown::Both);
                        return;
                    }
                }
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
}

fn die(msg: &str) -> ! {
    eprintln!("rollsafe-pod: {msg}");
    std::process::exit(2)
}

fn serve(pod: &Pod, stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    // A short read timeout lets an idle keep-alive connection notice a drain.
    stream.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let req = match read_request(&mut reader, pod)? {
            Some(r) => r,
            None => return Ok(()),
        };
        let control = req.path.starts_with("/__pod/");
        if !control {
            pod.in_flight.fetch_add(1, Ordering::SeqCst);
        }
        let handled = handle(pod, &req, &mut out);
        if !control {
            pod.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        let keep = req.keep_alive && handled?;
        if !keep || pod.terminating.load(Ordering::SeqCst) {
            let _ = out.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}

/// Reads one request. `None` when the peer closed, or when idle during a drain.
fn read_request(reader: &mut BufReader<TcpStream>, pod: &Pod) -> io::Result<Option<Req>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        match read_line(reader, &mut line) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {
                if head.is_empty() && line.is_empty() && pod.terminating.load(Ordering::SeqCst) {
                    return Ok(None);
                }
                if !line.is_empty() {
                    head.extend_from_slice(&line);
                }
                continue;
            }
            Err(e) => return Err(e),
        }
        head.extend_from_slice(&line);
        if head.ends_with(b"\r\n\r\n") || head == b"\r\n" {
            if head == b"\r\n" {
                head.clear();
                continue;
            }
            break;
        }
        if head.len() > 64 * 1024 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
        }
    }
    let mut hbuf = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut hbuf);
    parsed
        .parse(&head)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let method = parsed.method.unwrap_or("GET").to_string();
    let path = parsed.path.unwrap_or("/").to_string();
    let version = parsed.version.unwrap_or(1);
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let find = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    let keep_alive = match find("connection").as_deref() {
        Some("close") => false,
        Some("keep-alive") => true,
        _ => version == 1,
    };
    let chunked = find("transfer-encoding").is_some_and(|v| v.contains("chunked"));
    let declared = find("content-length").and_then(|v| v.trim().parse::<usize>().ok());
    let mut body = Vec::new();
    if let Err(e) = read_body(reader, chunked, declared, &mut body) {
        // The peer went away mid-body: a real app never runs such a request.
        append(
            &pod.attempts,
            &serde_json::json!({
                "ts_ms": now_ms(), "pod": pod.name, "group": pod.group, "aborted": true,
                "method": method, "path": path, "body_len": body.len(),
                "declared_len": declared, "error": e.to_string(),
            }),
        );
        return Err(e);
    }
    Ok(Some(Req {
        method,
        path,
        headers,
        body,
        keep_alive,
    }))
}

/// Reads a body framed by chunked encoding or `Content-Length` into `body` (what arrived is
/// kept even on error).
fn read_body(
    reader: &mut BufReader<TcpStream>,
    chunked: bool,
    declared: Option<usize>,
    body: &mut Vec<u8>,
) -> io::Result<()> {
    if chunked {
        loop {
            let mut line = Vec::new();
            read_line_blocking(reader, &mut line)?;
            let size = match httparse::parse_chunk_size(&line) {
                Ok(httparse::Status::Complete((_, n))) => n as usize,
                _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "bad chunk")),
            };
            if size == 0 {
                // trailers until blank line
                loop {
                    let mut t = Vec::new();
                    read_line_blocking(reader, &mut t)?;
                    if t == b"\r\n" || t.is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            if let Err((e, done)) = read_exact_blocking(reader, &mut body[start..]) {
                body.truncate(start + done);
                return Err(e);
            }
            let mut crlf = Vec::new();
            read_line_blocking(reader, &mut crlf)?;
        }
    } else if let Some(n) = declared {
        let mut buf = vec![0; n];
        let got = read_exact_blocking(reader, &mut buf);
        body.extend_from_slice(&buf);
        if let Err((e, done)) = got {
            body.truncate(done);
            return Err(e);
        }
    }
    Ok(())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn read_line(reader: &mut BufReader<TcpStream>, line: &mut Vec<u8>) -> io::Result<usize> {
    reader.read_until(b'\n', line)
}

fn read_line_blocking(reader: &mut BufReader<TcpStream>, line: &mut Vec<u8>) -> io::Result<()> {
    loop {
        match reader.read_until(b'\n', line) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) if line.ends_with(b"\n") => return Ok(()),
            Ok(_) => continue,
            Err(e) if is_timeout(&e) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Fills `buf`; on error, also how much arrived.
fn read_exact_blocking(
    reader: &mut BufReader<TcpStream>,
    buf: &mut [u8],
) -> Result<(), (io::Error, usize)> {
    let mut done = 0;
    while done < buf.len() {
        match reader.read(&mut buf[done..]) {
            Ok(0) => return Err((io::ErrorKind::UnexpectedEof.into(), done)),
            Ok(n) => done += n,
            Err(e) if is_timeout(&e) => continue,
            Err(e) => return Err((e, done)),
        }
    }
    Ok(())
}

fn append(file: &Mutex<File>, value: &serde_json::Value) {
    if let Ok(mut f) = file.lock() {
        let mut line = value.to_string();
        line.push('\n');
        let _ = f.write_all(line.as_bytes());
        let _ = f.flush();
    }
}

/// Appends the write to the ledger. (An upload's body is not copied into the ledger: its hash
/// says what was committed.)
fn commit_to_ledger(pod: &Pod, req: &Req, seq: u64, body_sha: &str) {
    let text = (req.body.len() <= 65536).then(|| String::from_utf8_lossy(&req.body));
    append(
        &pod.ledger,
        &serde_json::json!({
            "ts_ms": now_ms(), "pod": pod.name, "pid": std::process::id(), "group": pod.group, "seq": seq,
            "method": req.method, "path": req.path,
            "idempotency_key": req.header("idempotency-key"),
            "body": text, "body_len": req.body.len(), "body_sha256": body_sha,
        }),
    );
}

/// A write with a key being executed: a file named for the key and this process, removed when
/// the request ends. A pod killed mid-request leaves it behind, with a pid that is gone.
struct Running(PathBuf);

impl Running {
    fn start(pod: &Pod, key: &str, seq: u64) -> Running {
        let dir = pod.dir.join("running");
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!(
            "{}.{}.{seq}",
            hex_sha256(key.as_bytes()),
            std::process::id()
        ));
        let _ = File::create(&path);
        Running(path)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// An in-doubt request: as an application with a unique constraint on the key would, wait for
/// an execution of the key still running (on any pod, in a live process), then look the key up
/// in every pod's ledger. The earlier commit, if there is one.
fn already_done(pod: &Pod, key: &str) -> Option<serde_json::Value> {
    let prefix = format!("{}.", hex_sha256(key.as_bytes()));
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let running = std::fs::read_dir(pod.dir.join("running"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(&prefix))
            .any(|n| {
                let pid = n.split('.').nth(1).unwrap_or("");
                PathBuf::from(format!("/proc/{pid}")).exists()
            });
        if !running || Instant::now() > until {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    for entry in std::fs::read_dir(&pod.dir).ok()?.flatten() {
        let name = entry.file_name().into_string().unwrap_or_default();
        if !name.ends_with(".ledger.jsonl") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v.get("idempotency_key").and_then(|k| k.as_str()) == Some(key) {
                return Some(v);
            }
        }
    }
    None
}

fn is_write(method: &str) -> bool {
    matches!(method, "POST" | "PUT" | "PATCH" | "DELETE")
}

/// Handles one request; returns whether the connection may be kept.
fn handle(pod: &Pod, req: &Req, out: &mut TcpStream) -> io::Result<bool> {
    if let Some(rest) = req.path.strip_prefix("/__pod/") {
        return control(pod, rest, req, out);
    }
    let seq = pod.seq.fetch_add(1, Ordering::SeqCst) + 1;
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let body_sha = hex_sha256(&req.body);
    append(
        &pod.attempts,
        &serde_json::json!({
            "ts_ms": now_ms(), "pod": pod.name, "pid": std::process::id(), "group": pod.group, "seq": seq,
            "method": req.method, "path": req.path, "headers": headers,
            "body_len": req.body.len(), "body_sha256": body_sha,
        }),
    );
    let key = req.header("idempotency-key").map(str::to_string);
    if let (Some(key), true) = (&key, is_write(&req.method)) {
        if req.header("idempotency-in-doubt") == Some("true") {
            if let Some(original) = already_done(pod, key) {
                // Answered from the app's own records: an earlier attempt ran.
                let body = serde_json::json!({
                    "pod": pod.name, "seq": seq, "committed": false, "duplicate_of": original,
                })
                .to_string();
                respond(
                    out,
                    200,
                    &[("content-type".into(), "application/json".into())],
                    body.as_bytes(),
                    false,
                    req.keep_alive,
                )?;
                return Ok(true);
            }
        }
    }
    // Like a transaction holding the key's row: visible to an in-doubt retry until it ends.
    let _running = key
        .as_deref()
        .filter(|_| is_write(&req.method))
        .map(|k| Running::start(pod, k, seq));
    let act = next_act(pod, &req.path);
    if let Some(act) = &act {
        if act.delay_ms > 0 {
            thread::sleep(Duration::from_millis(act.delay_ms));
        }
        if act.reset {
            if act.commit && is_write(&req.method) {
                // The write ran, then the connection broke before the answer (a pod whose
                // node died just after the commit).
                commit_to_ledger(pod, req, seq, &body_sha);
            }
            // No FIN first: the connection is dropped with linger 0, so the peer gets a RST.
            let _ = socket_linger_zero(out);
            return Err(io::Error::other("reset by script"));
        }
        if act.close {
            let _ = out.shutdown(Shutdown::Both);
            return Ok(false);
        }
    }
    if pod.work_ms > 0 {
        thread::sleep(Duration::from_millis(pod.work_ms));
    }
    let scripted_status = act.as_ref().and_then(|a| a.status);
    let commit =
        is_write(&req.method) && act.as_ref().is_none_or(|a| a.commit || a.status.is_none());
    if commit {
        commit_to_ledger(pod, req, seq, &body_sha);
    }
    let status = scripted_status.unwrap_or(if req.method == "POST" { 201 } else { 200 });
    let body = match act.as_ref().and_then(|a| a.body.clone()) {
        Some(b) => b.into_bytes(),
        None => {
            let mut b = serde_json::json!({
                "pod": pod.name, "pid": std::process::id(), "group": pod.group, "seq": seq, "status": status,
                "method": req.method, "path": req.path, "committed": commit,
                "body_sha256": body_sha, "headers": headers,
            })
            .to_string()
            .into_bytes();
            b.push(b'\n');
            b
        }
    };
    let mut extra: Vec<(String, String)> = vec![
        ("x-pod".into(), pod.name.clone()),
        ("x-pod-group".into(), pod.group.clone()),
    ];
    let has_ct = act.as_ref().is_some_and(|a| {
        a.headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    });
    if !has_ct {
        extra.push(("content-type".into(), "application/json".into()));
    }
    if let Some(a) = &act {
        extra.extend(a.headers.iter().cloned());
    }
    // Draining: this is the connection's last answer.
    let keep = req.keep_alive && !pod.terminating.load(Ordering::SeqCst);
    respond(out, status, &extra, &body, req.method == "HEAD", keep)?;
    append(
        &pod.answers,
        &serde_json::json!({"ts_ms": now_ms(), "pod": pod.name, "pid": std::process::id(), "seq": seq, "status": status}),
    );
    Ok(true)
}

fn next_act(pod: &Pod, path: &str) -> Option<Act> {
    let mut script = pod.script.lock().ok()?;
    let idx = script
        .iter()
        .position(|a| a.path_prefix.as_deref().is_none_or(|p| path.starts_with(p)))?;
    let act = script.get_mut(idx)?;
    let taken = act.clone();
    act.count = act.count.saturating_sub(1);
    if act.count == 0 {
        script.remove(idx);
    }
    Some(taken)
}

fn control(pod: &Pod, what: &str, req: &Req, out: &mut TcpStream) -> io::Result<bool> {
    let (status, body) = match (req.method.as_str(), what) {
        ("GET", "health") => (
            200,
            serde_json::json!({
                "pod": pod.name,
                "in_flight": pod.in_flight.load(Ordering::SeqCst),
            })
            .to_string(),
        ),
        ("POST", "script") => match serde_json::from_slice::<Vec<Act>>(&req.body) {
            Ok(acts) => {
                if let Ok(mut s) = pod.script.lock() {
                    s.extend(acts);
                }
                (200, "{}".to_string())
            }
            Err(e) => (400, serde_json::json!({"error": e.to_string()}).to_string()),
        },
        ("DELETE", "script") => {
            if let Ok(mut s) = pod.script.lock() {
                s.clear();
            }
            (200, "{}".to_string())
        }
        _ => (404, "{}".to_string()),
    };
    respond(
        out,
        status,
        &[("content-type".into(), "application/json".into())],
        body.as_bytes(),
        false,
        req.keep_alive,
    )?;
    Ok(true)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn respond(
    out: &mut TcpStream,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    head_only: bool,
    keep_alive: bool,
) -> io::Result<()> {
    let mut msg = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (k, v) in headers {
        msg.push_str(&format!("{k}: {v}\r\n"));
    }
    msg.push_str(&format!("content-length: {}\r\n", body.len()));
    if !keep_alive {
        msg.push_str("connection: close\r\n");
    }
    msg.push_str("\r\n");
    let mut bytes = msg.into_bytes();
    if !head_only {
        bytes.extend_from_slice(body);
    }
    out.write_all(&bytes)?;
    out.flush()
}
