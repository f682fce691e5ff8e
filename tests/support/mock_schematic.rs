//! A stand-in for Schematic's capture API (`POST /batch`, SPEC section 3) for
//! integration tests.
//!
//! It plays the outside world, so it is strict: every request is checked
//! against the wire format before anything else, and each problem is recorded
//! in [`MockSchematic::violations`] and answered `400` with a JSON error that
//! names it. A test that ends with `violations()` empty has shown the daemon
//! speaks the format. Faults (an error status, a `Retry-After`, a slow answer,
//! a dropped connection) are queued with [`MockSchematic::push_faults`] and
//! taken one per well-formed request with the right API key.
//!
//! The server is a small hand-written HTTP/1.1 server (keep-alive,
//! `Content-Length` or chunked request bodies, `Content-Length` answers) on
//! its own std thread with its own tokio runtime, so it works the same under
//! a plain `#[test]` and a `#[tokio::test]`, and "close without answering" or
//! "answer slowly" are a line each. Dropping the [`MockSchematic`] stops the
//! server and joins its thread.

#![allow(dead_code)]

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Schematic's limit on events per request.
pub const MAX_BATCH_SIZE: usize = 100;
/// Schematic's limit on `idempotency_key`, in characters.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 255;
/// Request line plus headers larger than this are refused.
const MAX_HEAD_BYTES: u64 = 64 * 1024;
/// Request bodies larger than this are refused.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// How often the `wait_for_*` helpers look again.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// What the mock does with the next well-formed request instead of its normal
/// answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status (a 2xx counts as delivered).
    Status(u16),
    /// Answer this status with `Retry-After: <value>`.
    StatusWithRetryAfter(u16, String),
    /// Give the normal answer (200, or 400 for a rejected event) after this
    /// delay. The events count as delivered when the answer goes out, even if
    /// the client gave up waiting, as they would at Schematic.
    Delay(Duration),
    /// Close the connection without answering.
    Drop,
}

/// One request the mock received, whatever it answered.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    /// When the whole request had been read.
    pub at: Instant,
    pub at_utc: DateTime<Utc>,
    /// What the mock answered; 0 if it closed the connection instead.
    pub status: u16,
    /// The body as JSON; `Null` if it did not parse.
    pub body: Value,
    /// Header names lowercased, values as sent, in order.
    pub headers: Vec<(String, String)>,
    pub method: String,
    /// The request target as sent, query string included.
    pub path: String,
}

impl ReceivedRequest {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The events of the request (empty if the body had none).
    pub fn events(&self) -> Vec<Value> {
        self.body
            .get("events")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }
}

/// A running mock of the capture API. See the module comment.
pub struct MockSchematic {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct State {
    api_key: String,
    faults: VecDeque<Fault>,
    rejected_event: Option<String>,
    events: Vec<Value>,
    requests: Vec<ReceivedRequest>,
    violations: Vec<String>,
    in_flight: usize,
    max_in_flight: usize,
}

impl MockSchematic {
    /// Starts a server on `127.0.0.1:0` that accepts `api_key`.
    ///
    /// # Panics
    /// If the loopback port or the server thread cannot be had: the test
    /// cannot run without them.
    pub fn start(api_key: &str) -> MockSchematic {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("mock schematic: cannot bind a loopback port");
        let addr = listener
            .local_addr()
            .expect("mock schematic: a bound socket has an address");
        listener
            .set_nonblocking(true)
            .expect("mock schematic: cannot make the listener non-blocking");
        let state = Arc::new(Mutex::new(State {
            api_key: api_key.to_owned(),
            ..State::default()
        }));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let thread_state = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("mock-schematic".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("mock schematic: cannot build a tokio runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener)
                        .expect("mock schematic: cannot register the listener");
                    accept_loop(listener, thread_state, shutdown_rx).await;
                });
                // Dropping the runtime cancels connections still open.
            })
            .expect("mock schematic: cannot spawn the server thread");
        MockSchematic {
            state,
            addr,
            shutdown,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash; the daemon appends
    /// `/batch`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues faults for the next well-formed requests with the right key,
    /// one per request, in order.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.lock().faults.extend(faults);
    }

    /// Drops the faults not used yet.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// How many queued faults are still waiting for a request.
    pub fn pending_faults(&self) -> usize {
        self.lock().faults.len()
    }

    /// Answer `400 {"error":"..."}` to any batch that holds a `track` whose
    /// `body.event` is `name`; `None` stops rejecting. Not a violation: this
    /// is Schematic refusing one event.
    pub fn reject_event(&self, name: Option<&str>) {
        self.lock().rejected_event = name.map(str::to_owned);
    }

    /// Changes the accepted API key; requests with another key get 401.
    pub fn set_api_key(&self, key: &str) {
        key.clone_into(&mut self.lock().api_key);
    }

    /// Every event of every request answered 2xx, in the order the answers
    /// were given (arrival order, unless a `Delay` fault held one back).
    /// Repeats of one delivery appear as often as they were sent.
    pub fn events(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    /// `events()` with repeats of an `idempotency_key` left out, as
    /// Schematic's deduplication would: the first one stays.
    pub fn unique_events(&self) -> Vec<Value> {
        let mut seen = HashSet::new();
        self.events()
            .into_iter()
            .filter(|event| {
                let key = event.get("idempotency_key").and_then(Value::as_str);
                seen.insert(key.unwrap_or_default().to_owned())
            })
            .collect()
    }

    /// Every request, whatever was answered, in arrival order.
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        self.lock().requests.clone()
    }

    /// Wire-format problems seen, as `request N: where: what` (N indexes
    /// `requests()`). Each such request was answered 400.
    pub fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }

    /// The most requests the mock was handling at the same moment.
    pub fn max_in_flight(&self) -> usize {
        self.lock().max_in_flight
    }

    /// Waits, blocking the thread, until `events().len() >= n`; false on
    /// timeout. Under a `current_thread` `#[tokio::test]` that runs the
    /// daemon on the same runtime, use [`Self::wait_for_events_async`].
    pub fn wait_for_events(&self, n: usize, timeout: Duration) -> bool {
        poll_blocking(timeout, || self.lock().events.len() >= n)
    }

    /// Waits, blocking the thread, until `requests().len() >= n`.
    pub fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        poll_blocking(timeout, || self.lock().requests.len() >= n)
    }

    /// [`Self::wait_for_events`] that yields to the test's runtime instead of
    /// blocking it.
    pub async fn wait_for_events_async(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.lock().events.len() >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Drop for MockSchematic {
    fn drop(&mut self) {
        // The receiver is gone only if the server thread already ended.
        let _ = self.shutdown.send(true);
        if let Some(thread) = self.thread.take() {
            // A panic on the server thread already failed the test's output;
            // do not panic again while dropping.
            let _ = thread.join();
        }
    }
}

/// A panicking test thread must not hide the mock's state from the others.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

fn poll_blocking(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

// ---------------------------------------------------------------------------
// The server: accept loop, one task per connection, HTTP/1.1 framing.
// ---------------------------------------------------------------------------

async fn accept_loop(
    listener: TcpListener,
    state: Arc<Mutex<State>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(serve_connection(stream, Arc::clone(&state)));
                }
            }
            // A change or a dropped sender both mean stop.
            _ = shutdown.changed() => return,
        }
    }
}

/// One parsed HTTP request.
struct HttpRequest {
    method: String,
    path: String,
    version: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn keep_alive(&self) -> bool {
        let close = self
            .headers_named("connection")
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
        self.version == "HTTP/1.1" && !close
    }
}

enum ReadError {
    /// The peer went away or the socket failed: nothing to answer.
    Gone,
    /// Not HTTP/1.1 as we know it: answer 400 and close.
    Malformed(String),
}

/// What to do with one request.
enum Plan {
    Answer(Answer),
    AnswerAfter(Duration, Answer),
    Drop,
}

struct Answer {
    status: u16,
    body: Value,
    retry_after: Option<String>,
    /// Recorded as delivered just before the answer is written (2xx only).
    delivered: Vec<Value>,
}

async fn serve_connection(stream: TcpStream, state: Arc<Mutex<State>>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let request = match read_request(&mut reader).await {
            Ok(Some(request)) => request,
            Ok(None) | Err(ReadError::Gone) => return,
            Err(ReadError::Malformed(problem)) => {
                let status = 400;
                record_malformed(&state, &problem, status);
                let body = json!({ "error": format!("malformed HTTP request: {problem}") });
                let _ = write.write_all(&render(status, &body, None, true)).await;
                return;
            }
        };
        let keep_alive = request.keep_alive();
        {
            let mut state = lock(&state);
            state.in_flight += 1;
            state.max_in_flight = state.max_in_flight.max(state.in_flight);
        }
        let plan = handle(&state, request);
        let (answer, delay) = match plan {
            Plan::Drop => {
                lock(&state).in_flight -= 1;
                return;
            }
            Plan::Answer(answer) => (answer, None),
            Plan::AnswerAfter(delay, answer) => (answer, Some(delay)),
        };
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        // Recorded before the answer goes out, so a client that has seen its
        // 2xx always finds its events in `events()`.
        lock(&state).events.extend(answer.delivered);
        let bytes = render(
            answer.status,
            &answer.body,
            answer.retry_after.as_deref(),
            !keep_alive,
        );
        let written = write.write_all(&bytes).await.is_ok() && write.flush().await.is_ok();
        lock(&state).in_flight -= 1;
        if !written || !keep_alive {
            return;
        }
    }
}

/// Reads one request; `Ok(None)` on a clean end of the connection between
/// requests.
async fn read_request<R>(reader: &mut R) -> Result<Option<HttpRequest>, ReadError>
where
    R: AsyncBufRead + Unpin,
{
    let mut head = (&mut *reader).take(MAX_HEAD_BYTES);
    let request_line = match read_line(&mut head).await? {
        None => return Ok(None),
        Some(line) => line,
    };
    let mut parts = request_line.split(' ');
    let (method, path, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(p), Some(v), None) if !m.is_empty() && !p.is_empty() => {
            (m.to_owned(), p.to_owned(), v.to_owned())
        }
        _ => {
            return Err(ReadError::Malformed(format!(
                "bad request line {request_line:?}"
            )))
        }
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(ReadError::Malformed(format!(
            "unsupported version {version:?}"
        )));
    }
    let mut headers = Vec::new();
    loop {
        let line = read_line(&mut head)
            .await?
            .ok_or_else(|| ReadError::Malformed("connection closed inside the headers".into()))?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| ReadError::Malformed(format!("bad header line {line:?}")))?;
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(ReadError::Malformed(format!("bad header name {name:?}")));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    let mut request = HttpRequest {
        method,
        path,
        version,
        headers,
        body: Vec::new(),
    };
    let chunked = request
        .headers_named("transfer-encoding")
        .any(|v| v.to_ascii_lowercase().contains("chunked"));
    let lengths: Vec<&str> = request.headers_named("content-length").collect();
    request.body = if chunked {
        if !lengths.is_empty() {
            return Err(ReadError::Malformed(
                "both Transfer-Encoding and Content-Length".into(),
            ));
        }
        read_chunked(reader).await?
    } else {
        match lengths.as_slice() {
            [] => Vec::new(),
            [length] => {
                let length: usize = length
                    .parse()
                    .map_err(|_| ReadError::Malformed(format!("bad Content-Length {length:?}")))?;
                if length > MAX_BODY_BYTES {
                    return Err(ReadError::Malformed(format!(
                        "body of {length} bytes is over the mock's {MAX_BODY_BYTES}"
                    )));
                }
                let mut body = vec![0; length];
                reader
                    .read_exact(&mut body)
                    .await
                    .map_err(|_| ReadError::Gone)?;
                body
            }
            _ => {
                return Err(ReadError::Malformed(
                    "several Content-Length headers".into(),
                ))
            }
        }
    };
    Ok(Some(request))
}

/// One CRLF-terminated line without its terminator; `None` at a clean EOF.
async fn read_line<R>(reader: &mut R) -> Result<Option<String>, ReadError>
where
    R: AsyncBufRead + Unpin,
{
    let mut line = Vec::new();
    let n = reader
        .read_until(b'\n', &mut line)
        .await
        .map_err(|_| ReadError::Gone)?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with(b"\r\n") {
        return Err(ReadError::Malformed(
            "line not ended by CRLF, or request head too large".into(),
        ));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| ReadError::Malformed("request head is not UTF-8".into()))
}

async fn read_chunked<R>(reader: &mut R) -> Result<Vec<u8>, ReadError>
where
    R: AsyncBufRead + Unpin,
{
    let mut body = Vec::new();
    loop {
        let line = read_line(reader)
            .await?
            .ok_or_else(|| ReadError::Malformed("connection closed inside a chunk".into()))?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| ReadError::Malformed(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            // Trailers, up to the empty line.
            while !read_line(reader)
                .await?
                .ok_or_else(|| ReadError::Malformed("connection closed in trailers".into()))?
                .is_empty()
            {}
            return Ok(body);
        }
        if body.len() + size > MAX_BODY_BYTES {
            return Err(ReadError::Malformed("chunked body too large".into()));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader
            .read_exact(&mut body[start..])
            .await
            .map_err(|_| ReadError::Gone)?;
        let mut crlf = [0; 2];
        reader
            .read_exact(&mut crlf)
            .await
            .map_err(|_| ReadError::Gone)?;
        if crlf != *b"\r\n" {
            return Err(ReadError::Malformed("chunk not followed by CRLF".into()));
        }
    }
}

fn render(status: u16, body: &Value, retry_after: Option<&str>, close: bool) -> Vec<u8> {
    let body = body.to_string();
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        reason(status),
        body.len()
    );
    if let Some(value) = retry_after {
        head.push_str(&format!("Retry-After: {value}\r\n"));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

fn record_malformed(state: &Mutex<State>, problem: &str, status: u16) {
    let mut state = lock(state);
    let index = state.requests.len();
    state
        .violations
        .push(format!("request {index}: malformed HTTP: {problem}"));
    state.requests.push(ReceivedRequest {
        at: Instant::now(),
        at_utc: Utc::now(),
        status,
        body: Value::Null,
        headers: Vec::new(),
        method: String::new(),
        path: String::new(),
    });
}

// ---------------------------------------------------------------------------
// What to answer: wire-format checks, then the key, then faults.
// ---------------------------------------------------------------------------

fn handle(state: &Mutex<State>, request: HttpRequest) -> Plan {
    let at = Instant::now();
    let at_utc = Utc::now();
    let parsed = serde_json::from_slice::<Value>(&request.body);
    let check = check_request(&request, parsed.as_ref().map_err(ToString::to_string));
    let body = parsed.unwrap_or(Value::Null);
    let header_key = request
        .headers_named("x-schematic-api-key")
        .next()
        .unwrap_or_default()
        .to_owned();

    let mut state = lock(state);
    let index = state.requests.len();
    let plan = if !check.problems.is_empty() {
        state.violations.extend(
            check
                .problems
                .iter()
                .map(|problem| format!("request {index}: {problem}")),
        );
        let error = if check.batch_too_large {
            json!({ "error": "batch too large", "max_size": MAX_BATCH_SIZE })
        } else {
            json!({ "error": check.problems.join("; ") })
        };
        Plan::Answer(Answer::error(400, error))
    } else if header_key != state.api_key {
        Plan::Answer(Answer::error(401, json!({ "error": "invalid api key" })))
    } else {
        let normal = normal_answer(&body, state.rejected_event.as_deref());
        match state.faults.pop_front() {
            None => Plan::Answer(normal),
            Some(Fault::Delay(delay)) => Plan::AnswerAfter(delay, normal),
            Some(Fault::Drop) => Plan::Drop,
            Some(Fault::Status(status)) => Plan::Answer(Answer::fault(status, None, &body)),
            Some(Fault::StatusWithRetryAfter(status, value)) => {
                Plan::Answer(Answer::fault(status, Some(value), &body))
            }
        }
    };
    let status = match &plan {
        Plan::Answer(answer) | Plan::AnswerAfter(_, answer) => answer.status,
        Plan::Drop => 0,
    };
    state.requests.push(ReceivedRequest {
        at,
        at_utc,
        status,
        body,
        headers: request.headers,
        method: request.method,
        path: request.path,
    });
    plan
}

/// 200 `{"ok":true}`, or 400 if the batch holds the rejected event.
fn normal_answer(body: &Value, rejected_event: Option<&str>) -> Answer {
    let events = body["events"].as_array().cloned().unwrap_or_default();
    if let Some(name) = rejected_event {
        let hit = events
            .iter()
            .any(|e| e["type"] == "track" && e["body"]["event"] == name);
        if hit {
            return Answer::error(400, json!({ "error": format!("event {name:?} rejected") }));
        }
    }
    Answer {
        status: 200,
        body: json!({ "ok": true }),
        retry_after: None,
        delivered: events,
    }
}

impl Answer {
    fn error(status: u16, body: Value) -> Answer {
        Answer {
            status,
            body,
            retry_after: None,
            delivered: Vec::new(),
        }
    }

    /// An injected status; a 2xx delivers the events like a normal answer.
    fn fault(status: u16, retry_after: Option<String>, body: &Value) -> Answer {
        let success = (200..300).contains(&status);
        Answer {
            status,
            body: if success {
                json!({ "ok": true })
            } else {
                json!({ "error": format!("injected fault: status {status}") })
            },
            retry_after,
            delivered: if success {
                body["events"].as_array().cloned().unwrap_or_default()
            } else {
                Vec::new()
            },
        }
    }
}

#[derive(Default)]
struct Check {
    problems: Vec<String>,
    batch_too_large: bool,
}

/// Every way the request breaks SPEC section 3, except a wrong (but present)
/// API key, which is Schematic's normal 401.
fn check_request(request: &HttpRequest, body: Result<&Value, String>) -> Check {
    let mut check = Check::default();
    let out = &mut check.problems;
    if request.method != "POST" {
        out.push(format!("method must be POST, got {}", request.method));
    }
    if request.path != "/batch" {
        out.push(format!("path must be /batch, got {:?}", request.path));
    }
    match request.headers_named("content-type").collect::<Vec<_>>()[..] {
        [] => out.push("Content-Type header missing".into()),
        [value] => {
            let media = value.split(';').next().unwrap_or_default().trim();
            if !media.eq_ignore_ascii_case("application/json") {
                out.push(format!(
                    "Content-Type must be application/json, got {value:?}"
                ));
            }
        }
        _ => out.push("several Content-Type headers".into()),
    }
    let keys: Vec<&str> = request.headers_named("x-schematic-api-key").collect();
    let header_key = match keys[..] {
        [] => {
            out.push("X-Schematic-Api-Key header missing".into());
            None
        }
        [""] => {
            out.push("X-Schematic-Api-Key header empty".into());
            None
        }
        [key] => Some(key),
        _ => {
            out.push("several X-Schematic-Api-Key headers".into());
            None
        }
    };
    let body = match body {
        Ok(body) => body,
        Err(error) => {
            let encoding = request.headers_named("content-encoding").next();
            match encoding {
                Some(encoding) => out.push(format!(
                    "body is not JSON (Content-Encoding {encoding:?} is not accepted): {error}"
                )),
                None => out.push(format!("body is not JSON: {error}")),
            }
            return check;
        }
    };
    find_nulls(body, "$", out);
    let Some(object) = body.as_object() else {
        out.push(format!("body must be a JSON object, got {}", kind(body)));
        return check;
    };
    check_members(object, "$", &["events"], &[], out);
    let Some(events) = object.get("events") else {
        return check;
    };
    let Some(events) = events.as_array() else {
        out.push(format!("$.events must be an array, got {}", kind(events)));
        return check;
    };
    if events.is_empty() {
        out.push("$.events is empty".into());
    }
    if events.len() > MAX_BATCH_SIZE {
        out.push(format!(
            "batch too large: {} events, at most {MAX_BATCH_SIZE}",
            events.len()
        ));
        check.batch_too_large = true;
        return check;
    }
    for (i, event) in events.iter().enumerate() {
        check_event(event, &format!("$.events[{i}]"), header_key, out);
    }
    check
}

fn check_event(event: &Value, at: &str, header_key: Option<&str>, out: &mut Vec<String>) {
    let Some(object) = event.as_object() else {
        out.push(format!("{at} must be an object, got {}", kind(event)));
        return;
    };
    check_members(
        object,
        at,
        &["api_key", "type", "sent_at", "body", "idempotency_key"],
        &[],
        out,
    );
    if let Some(value) = object.get("api_key") {
        match value.as_str() {
            None => out.push(format!(
                "{at}.api_key must be a string, got {}",
                kind(value)
            )),
            Some(key) if header_key.is_some_and(|header| header != key) => out.push(format!(
                "{at}.api_key differs from the X-Schematic-Api-Key header"
            )),
            Some(_) => {}
        }
    }
    if let Some(value) = object.get("sent_at") {
        match value.as_str() {
            Some(text) if is_sent_at(text) => {}
            _ => out.push(format!(
                "{at}.sent_at must look like 2023-01-01T00:00:00.000Z, got {value}"
            )),
        }
    }
    if let Some(value) = object.get("idempotency_key") {
        match value.as_str() {
            Some("") => out.push(format!("{at}.idempotency_key is empty")),
            Some(key) if key.chars().count() > MAX_IDEMPOTENCY_KEY_CHARS => out.push(format!(
                "{at}.idempotency_key has {} characters, at most {MAX_IDEMPOTENCY_KEY_CHARS}",
                key.chars().count()
            )),
            Some(_) => {}
            None => out.push(format!(
                "{at}.idempotency_key must be a string, got {}",
                kind(value)
            )),
        }
    }
    let kind_of_event = object.get("type").and_then(Value::as_str);
    if let Some(value) = object.get("type") {
        if !matches!(kind_of_event, Some("track" | "identify")) {
            out.push(format!(
                "{at}.type must be \"track\" or \"identify\", got {value}"
            ));
        }
    }
    let body_at = format!("{at}.body");
    match object.get("body") {
        None => {}
        Some(Value::Object(body)) => match kind_of_event {
            Some("track") => check_track(body, &body_at, out),
            Some("identify") => check_identify(body, &body_at, out),
            _ => {}
        },
        Some(other) => out.push(format!("{body_at} must be an object, got {}", kind(other))),
    }
}

fn check_track(body: &Map<String, Value>, at: &str, out: &mut Vec<String>) {
    check_members(body, at, &["event"], &["company", "user", "traits"], out);
    if let Some(value) = body.get("event") {
        match value.as_str() {
            Some("") => out.push(format!("{at}.event is empty")),
            Some(name)
                if !name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                }) =>
            {
                out.push(format!(
                    "{at}.event {name:?} has characters outside [a-z0-9_-]"
                ))
            }
            Some(_) => {}
            None => out.push(format!("{at}.event must be a string, got {}", kind(value))),
        }
    }
    for map in ["company", "user"] {
        if let Some(value) = body.get(map) {
            check_string_map(value, &format!("{at}.{map}"), false, out);
        }
    }
    check_optional_object(body, at, "traits", out);
}

fn check_identify(body: &Map<String, Value>, at: &str, out: &mut Vec<String>) {
    check_members(body, at, &["keys"], &["name", "traits", "company"], out);
    if let Some(keys) = body.get("keys") {
        check_string_map(keys, &format!("{at}.keys"), true, out);
    }
    check_optional_string(body, at, "name", out);
    check_optional_object(body, at, "traits", out);
    let Some(company) = body.get("company") else {
        return;
    };
    let company_at = format!("{at}.company");
    let Some(company) = company.as_object() else {
        out.push(format!(
            "{company_at} must be an object, got {}",
            kind(company)
        ));
        return;
    };
    check_members(company, &company_at, &["keys"], &["name", "traits"], out);
    if let Some(keys) = company.get("keys") {
        check_string_map(keys, &format!("{company_at}.keys"), true, out);
    }
    check_optional_string(company, &company_at, "name", out);
    check_optional_object(company, &company_at, "traits", out);
}

/// Reports required members that are missing and members that are neither.
fn check_members(
    object: &Map<String, Value>,
    at: &str,
    required: &[&str],
    optional: &[&str],
    out: &mut Vec<String>,
) {
    for name in required {
        if !object.contains_key(*name) {
            out.push(format!("{at}.{name} is missing"));
        }
    }
    for name in object.keys() {
        if !required.contains(&name.as_str()) && !optional.contains(&name.as_str()) {
            out.push(format!("{at} has unexpected member {name:?}"));
        }
    }
}

fn check_string_map(value: &Value, at: &str, required: bool, out: &mut Vec<String>) {
    let Some(map) = value.as_object() else {
        out.push(format!("{at} must be an object, got {}", kind(value)));
        return;
    };
    if required && map.is_empty() {
        out.push(format!("{at} is empty"));
    }
    for (key, value) in map {
        if !value.is_string() {
            out.push(format!(
                "{at}.{key} must be a string, got {} {value}",
                kind(value)
            ));
        }
    }
}

fn check_optional_string(object: &Map<String, Value>, at: &str, name: &str, out: &mut Vec<String>) {
    if let Some(value) = object.get(name) {
        if !value.is_string() {
            out.push(format!("{at}.{name} must be a string, got {}", kind(value)));
        }
    }
}

fn check_optional_object(object: &Map<String, Value>, at: &str, name: &str, out: &mut Vec<String>) {
    if let Some(value) = object.get(name) {
        if !value.is_object() {
            out.push(format!(
                "{at}.{name} must be an object, got {}",
                kind(value)
            ));
        }
    }
}

/// Schematic's rule: optional fields are left out, never `null`.
fn find_nulls(value: &Value, at: &str, out: &mut Vec<String>) {
    match value {
        Value::Null => out.push(format!("{at} is null (leave optional fields out)")),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                find_nulls(item, &format!("{at}[{i}]"), out);
            }
        }
        Value::Object(members) => {
            for (name, member) in members {
                find_nulls(member, &format!("{at}.{name}"), out);
            }
        }
        _ => {}
    }
}

/// `^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$`, and a real date.
fn is_sent_at(text: &str) -> bool {
    const SHAPE: &[u8; 24] = b"0000-00-00T00:00:00.000Z";
    text.len() == SHAPE.len()
        && text.bytes().zip(SHAPE).all(|(b, &s)| match s {
            b'0' => b.is_ascii_digit(),
            _ => b == s,
        })
        && DateTime::parse_from_rfc3339(text).is_ok()
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}
