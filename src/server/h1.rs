//! Our own HTTP/1.1 server side for the request nearly every browser call is: one without a body
//! (GET, HEAD, DELETE… or `Content-Length: 0`). The connection's task reads the head, calls the
//! app and writes the answer itself, with no dispatcher between them. hyper's server cost ~13,000
//! instructions per proxied call (a quarter of the whole): parsing into its own buffers, a
//! dispatcher polling the service, the encoder and its write queue.
//!
//! Everything else goes to hyper, for the rest of the connection, with every byte read and not yet
//! answered ([`Ended::HandOver`]): a request with a body (`Transfer-Encoding`, or a
//! `Content-Length` other than one `0`), `Expect`, `Upgrade`, HTTP/1.0, `CONNECT`, a target that
//! is not origin-form, and any head that httparse refuses, with more than 100 fields or that
//! outgrows the size limit (hyper then answers 400 or 431 as it always did). So where a request
//! body ends — where request smuggling lives — is decided by hyper alone; a request served here
//! ends where its head ends.

use std::future::Future;
use std::mem::MaybeUninit;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use bytes::BytesMut;
use futures_util::FutureExt;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::proxy::passthrough::Passed;
use crate::session::cookie::CookieFields;

/// Fields per request head, as hyper.
const MAX_FIELDS: usize = 100;
/// Read buffer: what one read asks for at least.
const READ: usize = 8 * 1024;
/// Answer bytes gathered before a write; larger body chunks are written as they come.
const GATHER: usize = 16 * 1024;
/// Room for an answer's head (and a small body) taken at once: grown step by step from empty
/// it would be copied four or five times.
const ANSWER: usize = 1024;

#[derive(Debug, Clone, Copy)]
pub(super) struct Settings {
    /// A request head must arrive within this (from when the connection waits for it).
    pub header_read_timeout: Duration,
    /// A head not complete within this many bytes goes to hyper (which answers 431).
    pub max_head: usize,
}

/// How a connection left this loop.
#[derive(Debug)]
pub(super) enum Ended {
    /// Closed: by the client, after an answer that closes it, on shutdown, or on an I/O error.
    Closed,
    /// The header-read timeout struck with part of a request head received (answer 408).
    TimedOut(TcpStream),
    /// A request this loop does not serve: hyper serves the connection from here on, starting
    /// with these bytes (the unanswered request and whatever followed it).
    HandOver(TcpStream, BytesMut),
}

/// Serves requests on `stream` until it closes, times out, must go to hyper, or `stop` turns
/// true while it is idle. `handle` answers each request.
pub(super) async fn serve<F, Fut>(
    mut stream: TcpStream,
    settings: Settings,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    mut handle: F,
) -> Ended
where
    F: FnMut(Request<Body>, CookieFields) -> Fut,
    Fut: Future<Output = Response<Body>>,
{
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    // The header-read timeout: `due` is when the head being waited for must be complete; the
    // timer is moved to it only when it goes off early (it was set for an earlier head), not for
    // every request (a timer reset costs more than reading the clock).
    let mut due = tokio::time::Instant::now() + settings.header_read_timeout;
    let deadline = tokio::time::sleep_until(due);
    tokio::pin!(deadline);
    // After each answer the signal is only read (cheaper than polling the wait for it): true, or
    // its sender gone, closes the connection, as the wait would.
    let signal = stop.clone();
    // One wait for the stop signal for the connection's life (registered once, not per request).
    let stopping = super::stopped(stop);
    tokio::pin!(stopping);
    loop {
        let mut armed = false;
        let (request, cookies, close) = loop {
            match parse(&mut buf) {
                Head::Serve(request, cookies, close) => break (request, cookies, close),
                Head::HandOver => return Ended::HandOver(stream, buf),
                Head::Incomplete => {}
            }
            if buf.len() >= settings.max_head {
                return Ended::HandOver(stream, buf);
            }
            if !armed {
                due = tokio::time::Instant::now() + settings.header_read_timeout;
                armed = true;
            }
            let idle = buf.is_empty();
            tokio::select! {
                biased;
                read = fill(&mut stream, &mut buf) => match read {
                    Ok(0) | Err(_) => return Ended::Closed,
                    Ok(_) => {}
                },
                () = &mut deadline => {
                    if crate::went_off_early(deadline.as_mut(), due) {
                        continue;
                    }
                    return if idle { Ended::Closed } else { Ended::TimedOut(stream) };
                }
                () = &mut stopping, if idle => return Ended::Closed,
            }
        };
        let head_request = request.method() == Method::HEAD;
        let response = handle(request, cookies).await;
        let keep = write_answer(&mut stream, &mut out, response, head_request, close).await;
        if !keep || *signal.borrow() || signal.has_changed().is_err() {
            let _ = stream.shutdown().await;
            return Ended::Closed;
        }
        if buf.is_empty() {
            // Waits for the next head without a buffer (see [`fill`]); the next answer is
            // written from a fresh one too.
            crate::spare::give_back(std::mem::take(&mut buf));
            out = Vec::new();
        }
    }
}

/// Reads what arrived on `stream` into `buf`, growing it only once the socket is readable: a
/// keep-alive connection waiting for its next request holds no buffers (as in nginx), which is
/// what most browser connections do most of the time (measured: 2,000 idle connections cost
/// 4.7 KB each, 10.7 KB with an 8 KB read buffer kept per connection). The buffer comes from
/// those the thread's finished requests gave back ([`crate::spare`]).
///
/// The read itself is tokio's (`read_buf`), not `try_read_buf`: a read that leaves room in the
/// buffer has drained the socket, and tokio then forgets the readiness; after `try_read_buf` it
/// stays, and the wait for the next head costs a `recvfrom` that finds nothing (measured: 0.26
/// per request).
async fn fill(stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        std::task::ready!(stream.poll_read_ready(cx))?;
        if buf.capacity() == 0 {
            *buf = crate::spare::take(READ);
        } else if buf.capacity() - buf.len() < READ / 8 {
            buf.reserve(READ);
        }
        std::pin::pin!(stream.read_buf(buf)).poll(cx)
    })
    .await
}

// Returned once per request and taken apart at once: boxing the request would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Head {
    /// A complete head this loop serves (taken out of the buffer), its `Cookie` fields (not in
    /// its map), and whether the client asked to close the connection after it.
    Serve(Request<Body>, CookieFields, bool),
    /// For hyper: the buffer is as it was.
    HandOver,
    /// More bytes are needed.
    Incomplete,
}

/// The request head at the start of `buf`.
fn parse(buf: &mut BytesMut) -> Head {
    if buf.is_empty() {
        return Head::Incomplete;
    }
    let mut fields = [const { MaybeUninit::uninit() }; MAX_FIELDS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Head::Incomplete,
        Err(_) => return Head::HandOver,
    };
    let (Some(method), Some(path), Some(1)) = (parsed.method, parsed.path, parsed.version) else {
        return Head::HandOver;
    };
    if !path.starts_with('/') || method == "CONNECT" {
        return Head::HandOver;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Head::HandOver;
    };
    // Each name, and where its value is in `buf`: the values (and the target) then share its
    // memory once it is frozen, with no copy each.
    let base = buf.as_ptr() as usize;
    let mut close = false;
    let mut length = false;
    let mut named = Vec::with_capacity(parsed.headers.len());
    for f in parsed.headers.iter() {
        let Some(name) = known(f.name.as_bytes())
            .cloned()
            .or_else(|| HeaderName::from_bytes(f.name.as_bytes()).ok())
        else {
            return Head::HandOver;
        };
        if name == header::TRANSFER_ENCODING || name == header::EXPECT || name == header::UPGRADE {
            return Head::HandOver;
        }
        if name == header::CONTENT_LENGTH {
            if length || f.value != b"0" {
                return Head::HandOver;
            }
            length = true;
        }
        if name == header::CONNECTION && crate::proxy::headers::lists_close(f.value) {
            close = true;
        }
        let start = f.value.as_ptr() as usize - base;
        named.push((name, start, start + f.value.len()));
    }
    let target = path.as_ptr() as usize - base;
    let target = target..target + path.len();
    let head = buf.split_to(len).freeze();
    let built = http::Uri::from_maybe_shared(head.slice(target))
        .ok()
        .and_then(|uri| {
            // Room for what the proxy adds (`Authorization`, `X-Forwarded-For/-Proto/-Host`):
            // growing the map on the way out costs more than the few slots.
            let mut headers = crate::spare::map(named.len() + 4);
            // `Cookie`s stay out of the map (see `CookieFields`): httparse has checked them.
            let mut cookies = Vec::new();
            for (name, start, end) in named {
                if name == header::COOKIE {
                    cookies.push(head.slice(start..end));
                    continue;
                }
                headers.append(
                    name,
                    HeaderValue::from_maybe_shared(head.slice(start..end)).ok()?,
                );
            }
            let mut request = Request::new(Body::empty());
            *request.method_mut() = method;
            *request.uri_mut() = uri;
            *request.headers_mut() = headers;
            Some((request, CookieFields::new(cookies)))
        });
    match built {
        Some((request, cookies)) => Head::Serve(request, cookies, close),
        None => {
            // Refused by the types hyper builds too: hyper answers it, from the same bytes.
            let mut again = BytesMut::with_capacity(head.len() + buf.len());
            again.extend_from_slice(&head);
            again.extend_from_slice(buf);
            *buf = again;
            Head::HandOver
        }
    }
}

/// Request field names that `http` has no constant for but most requests carry (browsers' fetch
/// metadata and client hints, CSRF headers, proxies' and tracing's), as names made at compile
/// time: a name `HeaderName::from_bytes` has no constant for is lower-cased into an allocation
/// of its own, per field of every request.
/// A [`KNOWN`] entry: the name as text (compared without going through `HeaderName`) and as a
/// name.
macro_rules! known {
    ($($name:literal),* $(,)?) => {
        [$(($name, HeaderName::from_static($name))),*]
    };
}

static KNOWN: [(&str, HeaderName); 18] = known![
    "x-csrf",
    "priority",
    "sec-ch-ua",
    "tracestate",
    "traceparent",
    "x-csrf-token",
    "x-xsrf-token",
    "x-request-id",
    "sec-fetch-site",
    "sec-fetch-mode",
    "sec-fetch-dest",
    "sec-fetch-user",
    "x-forwarded-for",
    "sec-ch-ua-mobile",
    "x-requested-with",
    "x-forwarded-host",
    "x-forwarded-proto",
    "sec-ch-ua-platform",
];

/// The [`KNOWN`] name `name` is (as sent, any case), if any: by length first (the list is in
/// order of length; a test holds it to that).
fn known(name: &[u8]) -> Option<&'static HeaderName> {
    let range = match name.len() {
        6 => 0..1,
        8 => 1..2,
        9 => 2..3,
        10 => 3..4,
        11 => 4..5,
        12 => 5..8,
        14 => 8..12,
        15 => 12..13,
        16 => 13..16,
        17 => 16..17,
        18 => 17..18,
        _ => return None,
    };
    KNOWN
        .get(range)?
        .iter()
        .find(|(k, _)| name.eq_ignore_ascii_case(k.as_bytes()))
        .map(|(_, n)| n)
}

/// How the answer's body is delimited on the wire.
enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
}

/// Writes `response`; true when the connection can carry another request.
async fn write_answer(
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    response: Response<Body>,
    head_request: bool,
    close: bool,
) -> bool {
    let (mut parts, mut body) = response.into_parts();
    let status = parts.status;
    // The API's fields no rule reads, written after the map's as they came (see
    // `proxy::passthrough`): none of them decides the framing.
    let passed = parts.extensions.remove::<Passed>();
    let mut headers = parts.headers;
    // One pass over the names for what decides the framing (no lookup per field).
    let (mut closes, mut coded, mut dated) = (false, false, false);
    let mut length = Length::Absent;
    for (name, value) in &headers {
        if name == header::CONNECTION {
            closes |= crate::proxy::headers::lists_close(value.as_bytes());
        } else if name == header::TRANSFER_ENCODING {
            coded = true;
        } else if name == header::DATE {
            dated = true;
        } else if name == header::CONTENT_LENGTH {
            length = length.and(value.as_bytes());
        }
    }
    let mut keep = !close && !closes;
    // A framing of our own choosing: whatever the app set for it is replaced.
    if coded {
        headers.remove(header::TRANSFER_ENCODING);
    }
    let no_body_ever = status.is_informational() || status == StatusCode::NO_CONTENT;
    let declared = match length {
        Length::Absent => None,
        Length::Is(n) if !no_body_ever => Some(n),
        // Unusable (or not allowed): dropped, the framing is then ours.
        _ => {
            headers.remove(header::CONTENT_LENGTH);
            None
        }
    };
    let exact = body.size_hint().exact();
    let mut add_length = None;
    let framing = if no_body_ever || status == StatusCode::NOT_MODIFIED {
        Framing::None
    } else if head_request {
        if declared.is_none() {
            add_length = exact;
        }
        Framing::None
    } else if let Some(n) = declared {
        Framing::Length(n)
    } else if let Some(n) = exact {
        add_length = Some(n);
        Framing::Length(n)
    } else {
        Framing::Chunked
    };

    out.clear();
    out.reserve(ANSWER);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &headers {
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(p) = &passed {
        out.extend_from_slice(p.lines());
        dated |= p.dated();
    }
    if let Some(n) = add_length {
        let mut digits = [0u8; 20];
        field(out, b"content-length", decimal(n, &mut digits));
    }
    if matches!(framing, Framing::Chunked) {
        field(out, b"transfer-encoding", b"chunked");
    }
    if !dated {
        date(out);
    }
    if !keep && !closes {
        field(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    crate::spare::give_back_map(headers);

    if !matches!(framing, Framing::None) {
        let mut sent = 0u64;
        loop {
            // Gather while the body has more at once; write what is gathered before waiting.
            let frame = match body.frame().now_or_never() {
                Some(frame) => frame,
                None => {
                    if !flush(stream, out).await {
                        return false;
                    }
                    body.frame().await
                }
            };
            let data = match frame {
                None => break,
                // The body failed (the API went away mid-answer): the client must not take
                // what it got for the whole answer.
                Some(Err(_)) => return false,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    _ => continue,
                },
            };
            sent += data.len() as u64;
            match framing {
                Framing::Length(n) if sent > n => return false,
                Framing::Chunked => {
                    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                    if !send(stream, out, &data).await {
                        return false;
                    }
                    out.extend_from_slice(b"\r\n");
                }
                _ => {
                    if !send(stream, out, &data).await {
                        return false;
                    }
                }
            }
        }
        match framing {
            Framing::Length(n) if sent != n => keep = false,
            Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
            _ => {}
        }
    }
    let sent = flush(stream, out).await;
    // An idle connection keeps a small buffer, not the largest answer it ever gathered.
    if out.capacity() > 2 * GATHER {
        *out = Vec::new();
    }
    sent && keep
}

/// `n` in decimal, written at the end of `digits`.
fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &digits[at..];
        }
    }
}

/// One `name: value` line.
fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// What an answer's `Content-Length` fields say.
#[derive(Clone, Copy)]
enum Length {
    Absent,
    Is(u64),
    /// Malformed, or values that disagree.
    Unusable,
}

impl Length {
    /// With one more field value.
    fn and(self, value: &[u8]) -> Length {
        let n = std::str::from_utf8(value)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok());
        match (self, n) {
            (Length::Absent, Some(n)) => Length::Is(n),
            (Length::Is(m), Some(n)) if m == n => Length::Is(n),
            _ => Length::Unusable,
        }
    }
}

/// Appends `data` to what is gathered, or writes both when that grows too large.
async fn send(stream: &mut TcpStream, out: &mut Vec<u8>, data: &[u8]) -> bool {
    if out.len() + data.len() <= GATHER {
        out.extend_from_slice(data);
        return true;
    }
    flush(stream, out).await && stream.write_all(data).await.is_ok()
}

async fn flush(stream: &mut TcpStream, out: &mut Vec<u8>) -> bool {
    if out.is_empty() {
        return true;
    }
    let ok = stream.write_all(out).await.is_ok();
    out.clear();
    ok
}

thread_local! {
    /// The `Date` line of the current second (formatted once a second per thread, as hyper does).
    static DATE: std::cell::RefCell<(u64, Vec<u8>)> = const { std::cell::RefCell::new((u64::MAX, Vec::new())) };
}

fn date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != second {
            d.1.clear();
            field(&mut d.1, b"date", httpdate::fmt_http_date(now).as_bytes());
            d.0 = second;
        }
        out.extend_from_slice(&d.1);
    });
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use bytes::Bytes;
    use tokio::sync::watch;

    use super::*;

    fn settings() -> Settings {
        Settings {
            header_read_timeout: Duration::from_secs(10),
            max_head: 8192,
        }
    }

    /// A connected pair: the client's end and the server's.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    /// Answers `METHOD target` and the `x-echo` values in a body of known length, counting calls.
    fn echo(
        calls: &Arc<AtomicUsize>,
    ) -> impl Fn(Request<Body>) -> std::future::Ready<Response<Body>> {
        let calls = Arc::clone(calls);
        move |req: Request<Body>| {
            calls.fetch_add(1, Ordering::Relaxed);
            let echoed: Vec<&str> = req
                .headers()
                .get_all("x-echo")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            let text = format!("{} {} {}", req.method(), req.uri(), echoed.join("|"));
            std::future::ready(Response::new(Body::from(text)))
        }
    }

    /// Serves `server` with `handle` in a task; its outcome, and the stop switch.
    fn start<F, Fut>(
        server: TcpStream,
        settings: Settings,
        handle: F,
    ) -> (tokio::task::JoinHandle<Ended>, watch::Sender<bool>)
    where
        F: FnMut(Request<Body>) -> Fut + Send + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let (tx, mut rx) = watch::channel(false);
        let mut handle = handle;
        // The handlers here read cookies from the map.
        let handle = move |mut req: Request<Body>, cookies: CookieFields| {
            cookies.into_map(req.headers_mut());
            handle(req)
        };
        let task = tokio::spawn(async move { serve(server, settings, &mut rx, handle).await });
        (task, tx)
    }

    /// One answer from `client`: its head (lower-cased) and body, read by its framing.
    async fn answer(client: &mut TcpStream, pending: &mut Vec<u8>) -> (String, Vec<u8>) {
        let end = loop {
            if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            read_more(client, pending).await;
        };
        let head = String::from_utf8(pending.drain(..end).collect())
            .expect("utf-8 head")
            .to_ascii_lowercase();
        let mut body = Vec::new();
        if head.starts_with("http/1.1 204") || head.starts_with("http/1.1 304") {
            return (head, body);
        }
        if let Some(n) = field_value(&head, "content-length") {
            let n: usize = n.parse().expect("length");
            while pending.len() < n {
                read_more(client, pending).await;
            }
            body.extend(pending.drain(..n));
        } else if field_value(&head, "transfer-encoding") == Some("chunked") {
            loop {
                let line = loop {
                    if let Some(i) = pending.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    read_more(client, pending).await;
                };
                let size = std::str::from_utf8(&pending[..line]).expect("size");
                let size = usize::from_str_radix(size, 16).expect("hex size");
                while pending.len() < line + 2 + size + 2 {
                    read_more(client, pending).await;
                }
                body.extend(&pending[line + 2..line + 2 + size]);
                assert_eq!(&pending[line + 2 + size..line + 4 + size], b"\r\n");
                pending.drain(..line + 4 + size);
                if size == 0 {
                    break;
                }
            }
        }
        (head, body)
    }

    async fn read_more(client: &mut TcpStream, pending: &mut Vec<u8>) {
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk).await.expect("read");
        assert!(
            n > 0,
            "connection closed mid-answer: {:?}",
            String::from_utf8_lossy(pending)
        );
        pending.extend_from_slice(&chunk[..n]);
    }

    fn field_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            (n == name).then_some(v.trim())
        })
    }

    /// Everything the client receives until the server closes.
    async fn rest(client: &mut TcpStream, mut pending: Vec<u8>) -> Vec<u8> {
        client.read_to_end(&mut pending).await.expect("read to end");
        pending
    }

    /// Pieces of request heads, well-formed and not, for the differential test below.
    const METHODS: &[&str] = &[
        "GET", "GET", "POST", "DELETE", "HEAD", "PUT", "CONNECT", "get", "G@T",
    ];
    const TARGETS: &[&str] = &[
        "/",
        "/api/data?x=1",
        "/a%2Fb",
        "*",
        "http://h/a",
        "/a b",
        "/\u{e9}",
        "/a\x7f",
    ];
    const VERSIONS: &[&str] = &[
        "HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "http/1.1",
    ];
    const FIELDS: &[&str] = &[
        "Host: x",
        "Cookie: a=b; tg_session=c",
        "Content-Length: 0",
        "Content-Length:0",
        "Content-Length: 5",
        "Content-Length: 0, 0",
        "Content-Length: +0",
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: gzip, chunked",
        "transfer-encoding : chunked",
        "Connection: close",
        "Connection: keep-alive",
        "Expect: 100-continue",
        "Upgrade: h2c",
        "X-Tab: a\tb",
        "X-Fold: a\r\n b",
        "Bad Name: v",
        "X-Ctl: a\x01b",
        "X-Empty:",
        "X-Obs: caf\u{e9}",
    ];
    const TAILS: &[&str] = &["", "", "abcde", "0\r\n\r\n", "3\r\nabc\r\n0\r\n\r\n"];

    /// A request as the app sees it: method, target, fields by name (each name's values in
    /// order: `Cookie` fields that stay out of our map are put back at its end), body length.
    type Seen = (String, String, Vec<(String, Vec<u8>)>, usize);

    fn seen<B>(req: &Request<B>, cookies: CookieFields, body: usize) -> Seen {
        let mut headers = req.headers().clone();
        cookies.into_map(&mut headers);
        let mut fields: Vec<_> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        (
            req.method().to_string(),
            req.uri().to_string(),
            fields,
            body,
        )
    }

    /// What hyper's own server reads from `bytes`, request by request.
    async fn hyper_reads(bytes: Vec<u8>) -> Vec<Seen> {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let into = Arc::clone(&got);
        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let into = Arc::clone(&into);
            async move {
                let (parts, body) = req.into_parts();
                let n = body
                    .collect()
                    .await
                    .map_or(usize::MAX, |b| b.to_bytes().len());
                let req = Request::from_parts(parts, ());
                if let Ok(mut g) = into.lock() {
                    g.push(seen(&req, CookieFields::default(), n));
                }
                Ok::<_, std::convert::Infallible>(Response::new(
                    http_body_util::Empty::<Bytes>::new(),
                ))
            }
        });
        // half_close: the client's end of input must not cut short the answers to what it sent.
        let conn = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .serve_connection(hyper_util::rt::TokioIo::new(server), svc);
        let talk = async move {
            let _ = client.write_all(&bytes).await;
            let _ = client.shutdown().await;
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            futures_util::future::join(conn, talk),
        )
        .await;
        let out = got.lock().map(|g| g.clone()).unwrap_or_default();
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Every request this loop serves from a byte stream, hyper reads the same way (method,
        /// target, fields, and no body), in the same order; and what it does not serve it hands
        /// over untouched. So serving here never splits a stream where hyper would not.
        #[test]
        fn what_this_loop_serves_hyper_reads_the_same(
            requests in proptest::collection::vec(
                (
                    proptest::sample::select(METHODS),
                    proptest::sample::select(TARGETS),
                    proptest::sample::select(VERSIONS),
                    proptest::collection::vec(proptest::sample::select(FIELDS), 0..5),
                    proptest::sample::select(TAILS),
                    proptest::bool::ANY,
                ),
                1..4,
            )
        ) {
            let mut bytes = Vec::new();
            for (method, target, version, fields, tail, lf_only) in &requests {
                let eol = if *lf_only { "\n" } else { "\r\n" };
                bytes.extend_from_slice(format!("{method} {target} {version}{eol}").as_bytes());
                for f in fields {
                    bytes.extend_from_slice(format!("{f}{eol}").as_bytes());
                }
                bytes.extend_from_slice(eol.as_bytes());
                bytes.extend_from_slice(tail.as_bytes());
            }
            let mut buf = BytesMut::from(&bytes[..]);
            let mut ours = Vec::new();
            loop {
                let before = buf.clone();
                match parse(&mut buf) {
                    // The loop closes after a request that asked it to: nothing after it is read.
                    Head::Serve(req, cookies, true) => {
                        ours.push(seen(&req, cookies, 0));
                        break;
                    }
                    Head::Serve(req, cookies, false) => ours.push(seen(&req, cookies, 0)),
                    Head::HandOver | Head::Incomplete => {
                        proptest::prop_assert_eq!(&buf[..], &before[..], "handed over untouched");
                        break;
                    }
                }
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let theirs = rt.block_on(hyper_reads(bytes.clone()));
            proptest::prop_assert!(
                theirs.len() >= ours.len() && theirs[..ours.len()] == ours[..],
                "ours {:?}\nhyper {:?}\nbytes {:?}",
                ours,
                theirs,
                String::from_utf8_lossy(&bytes)
            );
        }
    }

    #[test]
    fn known_names_are_the_names_parsing_gives() {
        for (i, (k, n)) in KNOWN.iter().enumerate() {
            assert_eq!(n.as_str(), *k);
            assert!(
                KNOWN
                    .get(i + 1)
                    .is_none_or(|(next, _)| next.len() >= k.len()),
                "{k}"
            );
            for sent in [
                k.to_string(),
                k.to_ascii_uppercase(),
                k.replacen('s', "S", 1),
            ] {
                let parsed = HeaderName::from_bytes(sent.as_bytes()).expect("name");
                assert_eq!(known(sent.as_bytes()), Some(&parsed), "{sent}");
            }
        }
        for other in [
            "host",
            "x-csr",
            "x-csrf-",
            "sec-fetch",
            "traceparent2",
            "",
            "x_csrf",
        ] {
            assert_eq!(known(other.as_bytes()), None, "{other}");
        }
    }

    #[test]
    fn content_length_values_frame_the_answer_only_when_they_agree() {
        let length = |values: &[&[u8]]| values.iter().fold(Length::Absent, |l, v| l.and(v));
        assert!(matches!(length(&[]), Length::Absent));
        assert!(matches!(length(&[b"12"]), Length::Is(12)));
        assert!(matches!(length(&[b"12", b"12"]), Length::Is(12)));
        assert!(matches!(length(&[b"12", b"13"]), Length::Unusable));
        assert!(matches!(length(&[b"x", b"12"]), Length::Unusable));
        for bad in [
            &b""[..],
            b"+1",
            b" 1",
            b"1,1",
            b"0x1",
            b"99999999999999999999999",
        ] {
            assert!(matches!(length(&[bad]), Length::Unusable), "{bad:?}");
        }
        let mut digits = [0u8; 20];
        for n in [0, 7, 10, 1_234_567_890, u64::MAX] {
            assert_eq!(decimal(n, &mut digits), n.to_string().as_bytes());
        }
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_on_one_connection() {
        let calls = Arc::new(AtomicUsize::new(0));
        let (mut client, server) = pair().await;
        let (task, _stop) = start(server, settings(), echo(&calls));
        client
            .write_all(
                b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
                  DELETE /b?q=1 HTTP/1.1\r\nHost: x\r\nX-Echo: one\r\nx-echo: two\r\nContent-Length: 0\r\n\r\n",
            )
            .await
            .expect("write");
        let mut pending = Vec::new();
        let (head, body) = answer(&mut client, &mut pending).await;
        assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
        assert_eq!(field_value(&head, "content-length"), Some("7"));
        assert!(field_value(&head, "date").is_some_and(|d| d.ends_with(" gmt")));
        assert_eq!(body, b"GET /a ");
        let (_, body) = answer(&mut client, &mut pending).await;
        assert_eq!(body, b"DELETE /b?q=1 one|two");
        // Still open for the next one.
        client
            .write_all(b"GET /c HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let (_, body) = answer(&mut client, &mut pending).await;
        assert_eq!(body, b"GET /c ");
        drop(client);
        assert!(matches!(task.await.expect("task"), Ended::Closed));
        assert_eq!(calls.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn an_answer_of_unknown_length_is_chunked_and_head_gets_no_body() {
        let (mut client, server) = pair().await;
        let (_task, _stop) = start(server, settings(), |req: Request<Body>| {
            let parts: Vec<Result<Bytes, std::io::Error>> = if req.uri().path() == "/empty" {
                vec![]
            } else {
                vec![
                    Ok(Bytes::from("ab")),
                    Ok(Bytes::new()),
                    Ok(Bytes::from("cde")),
                ]
            };
            let mut resp = Response::new(Body::from_stream(futures_util::stream::iter(parts)));
            // A framing the app set is not trusted: ours replaces it.
            resp.headers_mut()
                .insert(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
            std::future::ready(resp)
        });
        client
            .write_all(b"GET /s HTTP/1.1\r\n\r\nGET /empty HTTP/1.1\r\n\r\nHEAD /s HTTP/1.1\r\n\r\nGET /s HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut pending = Vec::new();
        let (head, body) = answer(&mut client, &mut pending).await;
        assert_eq!(field_value(&head, "transfer-encoding"), Some("chunked"));
        assert_eq!(head.matches("transfer-encoding").count(), 1, "{head}");
        assert!(!head.contains("content-length"));
        assert_eq!(body, b"abcde");
        let (_, body) = answer(&mut client, &mut pending).await;
        assert_eq!(body, b"");
        // HEAD: the head alone (so the next answer starts right after it).
        let end = loop {
            if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            read_more(&mut client, &mut pending).await;
        };
        let head: Vec<u8> = pending.drain(..end).collect();
        assert!(head.starts_with(b"HTTP/1.1 200 OK\r\n"));
        let (head, body) = answer(&mut client, &mut pending).await;
        assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
        assert_eq!(body, b"abcde");
    }

    #[tokio::test]
    async fn answers_larger_than_the_gather_buffer_arrive_whole_and_in_order() {
        let (mut client, server) = pair().await;
        let (_task, _stop) = start(server, settings(), |req: Request<Body>| {
            let resp = if req.uri().path() == "/one" {
                Response::new(Body::from(vec![b'a'; 5 * GATHER]))
            } else {
                let parts: Vec<Result<Bytes, std::io::Error>> = vec![
                    Ok(Bytes::from(vec![b'b'; GATHER - 10])),
                    Ok(Bytes::from(vec![b'c'; 2 * GATHER])),
                    Ok(Bytes::from_static(b"d")),
                ];
                Response::new(Body::from_stream(futures_util::stream::iter(parts)))
            };
            std::future::ready(resp)
        });
        client
            .write_all(
                b"GET /one HTTP/1.1\r\n\r\nGET /chunks HTTP/1.1\r\n\r\nGET /one HTTP/1.1\r\n\r\n",
            )
            .await
            .expect("write");
        let mut pending = Vec::new();
        let (_, body) = answer(&mut client, &mut pending).await;
        assert_eq!(body, vec![b'a'; 5 * GATHER]);
        let (_, body) = answer(&mut client, &mut pending).await;
        let want = [
            vec![b'b'; GATHER - 10],
            vec![b'c'; 2 * GATHER],
            b"d".to_vec(),
        ]
        .concat();
        assert_eq!(body, want);
        let (_, body) = answer(&mut client, &mut pending).await;
        assert_eq!(body.len(), 5 * GATHER);
    }

    #[tokio::test]
    async fn passed_fields_follow_the_maps_as_they_came_and_their_date_is_the_only_one() {
        let (mut client, server) = pair().await;
        let (_task, _stop) = start(server, settings(), |req: Request<Body>| {
            let mut resp = Response::new(Body::from("{}"));
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            let mut lines = crate::proxy::passthrough::Lines::with_capacity(64);
            lines.push(b"Server", b"api");
            if req.uri().path() == "/dated" {
                lines.push(b"Date", b"Mon, 07 Dec 2026 18:00:00 GMT");
            }
            lines.push(b"X-API", b"a: b");
            resp.extensions_mut().insert(lines.done());
            std::future::ready(resp)
        });
        client
            .write_all(b"GET /dated HTTP/1.1\r\n\r\nGET /plain HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut pending = Vec::new();
        let (head, body) = answer(&mut client, &mut pending).await;
        assert!(
            head.starts_with(
                "http/1.1 200 ok\r\ncache-control: no-store\r\nserver: api\r\n\
                 date: mon, 07 dec 2026 18:00:00 gmt\r\nx-api: a: b\r\ncontent-length: 2\r\n"
            ),
            "{head}"
        );
        assert_eq!(head.matches("date:").count(), 1, "{head}");
        assert_eq!(body, b"{}");
        let (head, body) = answer(&mut client, &mut pending).await;
        assert!(head.contains("server: api\r\nx-api: a: b\r\n"), "{head}");
        assert_eq!(head.matches("date:").count(), 1, "our own date: {head}");
        assert_eq!(body, b"{}");
    }

    #[tokio::test]
    async fn head_and_bodiless_statuses_keep_their_framing_fields_right() {
        let (mut client, server) = pair().await;
        let (_task, _stop) = start(server, settings(), |req: Request<Body>| {
            let mut resp = Response::new(Body::from("12345"));
            match req.uri().path() {
                "/204" => {
                    *resp.status_mut() = StatusCode::NO_CONTENT;
                    resp.headers_mut()
                        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
                }
                "/304" => *resp.status_mut() = StatusCode::NOT_MODIFIED,
                // Lengths that disagree: dropped, and the body's own length is sent.
                "/two" => {
                    resp.headers_mut()
                        .append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
                    resp.headers_mut()
                        .append(header::CONTENT_LENGTH, HeaderValue::from_static("6"));
                }
                _ => {}
            }
            std::future::ready(resp)
        });
        client
            .write_all(b"HEAD /x HTTP/1.1\r\n\r\nGET /204 HTTP/1.1\r\n\r\nGET /304 HTTP/1.1\r\n\r\nGET /two HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut pending = Vec::new();
        // HEAD: the length the GET would have, no body (the next answer follows at once).
        let end = loop {
            if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            read_more(&mut client, &mut pending).await;
        };
        let head = String::from_utf8(pending.drain(..end).collect()).expect("utf-8");
        assert!(head.contains("content-length: 5\r\n"), "{head}");
        let (head, _) = answer(&mut client, &mut pending).await;
        assert!(head.starts_with("http/1.1 204 no content\r\n"), "{head}");
        assert!(!head.contains("content-length"), "{head}");
        let (head, _) = answer(&mut client, &mut pending).await;
        assert!(head.starts_with("http/1.1 304 not modified\r\n"), "{head}");
        let (head, body) = answer(&mut client, &mut pending).await;
        assert_eq!(head.matches("content-length").count(), 1, "{head}");
        assert_eq!(body, b"12345");
        let (head, body) = answer(&mut client, &mut pending).await;
        assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
        assert_eq!(body, b"12345");
    }

    #[tokio::test]
    async fn connection_close_from_either_side_closes_after_the_answer() {
        let calls = Arc::new(AtomicUsize::new(0));
        let (mut client, server) = pair().await;
        let (task, _stop) = start(server, settings(), echo(&calls));
        client
            .write_all(b"GET /a HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\nGET /never HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut pending = Vec::new();
        let (head, body) = answer(&mut client, &mut pending).await;
        assert_eq!(field_value(&head, "connection"), Some("close"));
        assert_eq!(body, b"GET /a ");
        assert_eq!(rest(&mut client, pending).await, b"");
        assert!(matches!(task.await.expect("task"), Ended::Closed));
        assert_eq!(calls.load(Ordering::Relaxed), 1);

        // The app's answer says close: said once, and done.
        let (mut client, server) = pair().await;
        let (task, _stop) = start(server, settings(), |_req: Request<Body>| {
            let mut resp = Response::new(Body::from("bye"));
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            std::future::ready(resp)
        });
        client
            .write_all(b"GET /a HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut pending = Vec::new();
        let (head, body) = answer(&mut client, &mut pending).await;
        assert_eq!(head.matches("connection").count(), 1, "{head}");
        assert_eq!(body, b"bye");
        assert_eq!(rest(&mut client, pending).await, b"");
        assert!(matches!(task.await.expect("task"), Ended::Closed));
    }

    #[tokio::test]
    async fn requests_this_loop_does_not_serve_go_to_hyper_byte_for_byte() {
        let refused: &[&[u8]] = &[
            b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            b"POST /a HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            b"POST /a HTTP/1.1\r\nContent-Length: 00\r\n\r\n",
            b"POST /a HTTP/1.1\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET /a HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"GET /a HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"GET /a HTTP/1.0\r\n\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\n\r\n",
            b"GET http://example.com/a HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            b"GET /a HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            b"GET /a HTTP/1.1\r\nX : a\r\n\r\n",
            b"GET /a HTTP/1.1\r\nX: a\x01b\r\n\r\n",
            b"GET /a HTTP/2.0\r\n\r\n",
            b"GET /a\x7f HTTP/1.1\r\n\r\n",
            b"G@T /a HTTP/1.1\r\n\r\n",
            b"GET /a HTTP/1.1\r\nNo-colon\r\n\r\n",
            b"GET /a\x00 HTTP/1.1\r\n\r\n",
        ];
        for sent in refused {
            let calls = Arc::new(AtomicUsize::new(0));
            let (mut client, server) = pair().await;
            client.write_all(sent).await.expect("write");
            let (task, _stop) = start(server, settings(), echo(&calls));
            let Ended::HandOver(_, unread) = task.await.expect("task") else {
                panic!("served: {:?}", String::from_utf8_lossy(sent));
            };
            assert_eq!(&unread[..], *sent, "{:?}", String::from_utf8_lossy(sent));
            assert_eq!(calls.load(Ordering::Relaxed), 0);
        }
        // More than 100 fields, and a head that outgrows the limit before it ends.
        let mut many = b"GET /a HTTP/1.1\r\n".to_vec();
        for i in 0..101 {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let long = [b"GET /a HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 9000]].concat();
        for sent in [many, long] {
            let calls = Arc::new(AtomicUsize::new(0));
            let (mut client, server) = pair().await;
            let writer = tokio::spawn(async move {
                let _ = client.write_all(&sent).await;
                (client, sent)
            });
            let (task, _stop) = start(server, settings(), echo(&calls));
            let Ended::HandOver(_, unread) = task.await.expect("task") else {
                panic!("served");
            };
            let (_client, sent) = writer.await.expect("writer");
            assert!(
                sent.starts_with(&unread),
                "hand-over keeps the bytes in order"
            );
            assert_eq!(calls.load(Ordering::Relaxed), 0);
        }
    }

    #[tokio::test]
    async fn after_a_served_request_the_first_with_a_body_goes_to_hyper_with_what_follows() {
        let calls = Arc::new(AtomicUsize::new(0));
        let (mut client, server) = pair().await;
        let (task, _stop) = start(server, settings(), echo(&calls));
        let rest_of_it = b"PUT /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /c HTTP/1.1\r\n\r\n";
        client
            .write_all(&[b"GET /a HTTP/1.1\r\n\r\n".as_slice(), rest_of_it].concat())
            .await
            .expect("write");
        let mut pending = Vec::new();
        let (_, body) = answer(&mut client, &mut pending).await;
        assert_eq!(body, b"GET /a ");
        let Ended::HandOver(_, unread) = task.await.expect("task") else {
            panic!("not handed over");
        };
        assert_eq!(&unread[..], rest_of_it);
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_slow_head_is_timed_out_an_idle_connection_closed_quietly() {
        let quick = Settings {
            header_read_timeout: Duration::from_millis(200),
            ..settings()
        };
        let calls = Arc::new(AtomicUsize::new(0));
        let (mut client, server) = pair().await;
        client
            .write_all(b"GET /a HTTP/1.1\r\nHo")
            .await
            .expect("write");
        let (task, _stop) = start(server, quick, echo(&calls));
        assert!(matches!(task.await.expect("task"), Ended::TimedOut(_)));

        let (_client, server) = pair().await;
        let (task, _stop) = start(server, quick, echo(&calls));
        assert!(matches!(task.await.expect("task"), Ended::Closed));
        assert_eq!(calls.load(Ordering::Relaxed), 0);
    }

    /// The header-read timer is moved to the current head's deadline only when it goes off early:
    /// a connection in steady use for several timeouts stays open, and a slow head on it is still
    /// timed out.
    #[tokio::test]
    async fn the_header_timeout_follows_each_new_head() {
        let timeout = Settings {
            header_read_timeout: Duration::from_millis(1000),
            ..settings()
        };
        let calls = Arc::new(AtomicUsize::new(0));
        let (mut client, server) = pair().await;
        let (task, _stop) = start(server, timeout, echo(&calls));
        let mut pending = Vec::new();
        // 2.5 timeouts of requests, 250 ms apart.
        for i in 0..10 {
            let req = format!("GET /{i} HTTP/1.1\r\n\r\n");
            client.write_all(req.as_bytes()).await.expect("write");
            let (head, body) = answer(&mut client, &mut pending).await;
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert_eq!(body, format!("GET /{i} ").as_bytes());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(!task.is_finished(), "closed while in use");
        client
            .write_all(b"GET /slow HTTP/1.1\r\nHo")
            .await
            .expect("write");
        assert!(matches!(task.await.expect("task"), Ended::TimedOut(_)));
        assert_eq!(calls.load(Ordering::Relaxed), 10);
    }

    #[tokio::test]
    async fn stop_lets_the_request_under_way_finish_then_closes() {
        let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (release_tx, release_rx) = watch::channel(false);
        let (mut client, server) = pair().await;
        let (task, stop) = start(server, settings(), move |_req: Request<Body>| {
            let _ = entered_tx.send(());
            let mut release = release_rx.clone();
            async move {
                let _ = release.wait_for(|r| *r).await;
                Response::new(Body::from("done"))
            }
        });
        client
            .write_all(b"GET /slow HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        entered.recv().await.expect("in the handler");
        stop.send_replace(true);
        release_tx.send_replace(true);
        let mut pending = Vec::new();
        let (_, body) = answer(&mut client, &mut pending).await;
        assert_eq!(body, b"done");
        assert_eq!(rest(&mut client, pending).await, b"");
        assert!(matches!(task.await.expect("task"), Ended::Closed));

        // Idle when stop comes: closed without a byte.
        let (mut client, server) = pair().await;
        let calls = Arc::new(AtomicUsize::new(0));
        let (task, stop) = start(server, settings(), echo(&calls));
        stop.send_replace(true);
        assert!(matches!(task.await.expect("task"), Ended::Closed));
        assert_eq!(rest(&mut client, Vec::new()).await, b"");
    }

    #[tokio::test]
    async fn a_body_that_breaks_its_framing_closes_the_connection() {
        let (mut client, server) = pair().await;
        let (task, _stop) = start(server, settings(), |req: Request<Body>| {
            let resp = match req.uri().path() {
                // Declares 10, ends after 3.
                "/short" => Response::builder()
                    .header(header::CONTENT_LENGTH, "10")
                    .body(Body::from_stream(futures_util::stream::iter(vec![Ok::<
                        _,
                        std::io::Error,
                    >(
                        Bytes::from("abc"),
                    )])))
                    .expect("response"),
                // Fails after a first chunk.
                _ => Response::new(Body::from_stream(futures_util::stream::iter(vec![
                    Ok(Bytes::from("ab")),
                    Err(std::io::Error::other("gone")),
                ]))),
            };
            std::future::ready(resp)
        });
        client
            .write_all(b"GET /short HTTP/1.1\r\n\r\nGET /next HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let got = rest(&mut client, Vec::new()).await;
        let got = String::from_utf8_lossy(&got);
        assert!(got.ends_with("\r\n\r\nabc"), "{got}");
        assert_eq!(got.matches("HTTP/1.1").count(), 1, "{got}");
        assert!(matches!(task.await.expect("task"), Ended::Closed));

        let (mut client, server) = pair().await;
        let (task, _stop) = start(server, settings(), |_req: Request<Body>| {
            std::future::ready(Response::new(Body::from_stream(
                futures_util::stream::iter(vec![
                    Ok(Bytes::from("ab")),
                    Err(std::io::Error::other("gone")),
                ]),
            )))
        });
        client
            .write_all(b"GET /fail HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let got = rest(&mut client, Vec::new()).await;
        assert!(
            !got.ends_with(b"0\r\n\r\n"),
            "a failed body must not look complete"
        );
        assert!(matches!(task.await.expect("task"), Ended::Closed));
    }
}
