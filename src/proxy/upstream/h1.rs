//! Our own HTTP/1.1 client connection, for API calls without a request body (GET, HEAD,
//! DELETE...: nearly every call). The request's own task writes the head and reads the answer.
//! hyper's client connection is a task of its own reached through channels: handing each call
//! to it and the answer back cost more per call (callgrind: ~17,000 instructions of ~54,600)
//! than all of the proxy's header and session work. Calls with a body still go through hyper's
//! client (it reads an early answer while the upload is still going).
//!
//! Framing follows RFC 9112 §6.3, strictly. A connection is used again only when its answer
//! ended exactly where its framing said, with nothing after it, on HTTP/1.1 without
//! `Connection: close`: one answer can never be read as part of the next.

use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use hyper::body::{Frame, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::proxy::passthrough;

type MaybeHttps = hyper_rustls::MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

/// A connection to an API: a plain one is read and written directly, not through the two
/// adapters between tokio's and hyper's I/O traits that the connector's stream needs.
pub enum Io {
    Plain(tokio::net::TcpStream),
    /// Boxed: a TLS stream is large, and a connection moves from the pool to the call to the
    /// body and back on every call.
    Tls(Box<TokioIo<MaybeHttps>>),
}

impl From<MaybeHttps> for Io {
    fn from(s: MaybeHttps) -> Self {
        match s {
            hyper_rustls::MaybeHttpsStream::Http(tcp) => Io::Plain(tcp.into_inner()),
            tls => Io::Tls(Box::new(TokioIo::new(tls))),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Header fields read from one answer (hyper's client limit too).
const MAX_HEADERS: usize = 100;
/// The longest answer head read (status line and header fields).
const MAX_HEAD: usize = 64 * 1024;
/// Room made before each read of a head.
const HEAD_READ: usize = 8 * 1024;
/// Room made before each read of a body: big enough for a fast stream.
const BODY_READ: usize = 64 * 1024;
/// The longest chunk-size line (with its extensions).
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Trailer fields read (and dropped) after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

/// Why an answer could not be read. The messages name no header or value: they are logged.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the connection to the API failed")]
    Io(#[from] std::io::Error),
    #[error("the API closed the connection without answering")]
    Closed,
    #[error("the API's answer is not valid HTTP/1.1: {0}")]
    Invalid(&'static str),
    #[error("the API did not answer in time")]
    TimedOut,
}

/// A failed exchange, and whether the request may go on another connection: it did not go out
/// whole, or (for a safe method) the connection closed before a byte of answer came.
#[derive(Debug)]
pub struct Failed {
    pub error: Error,
    pub retry: bool,
}

/// How an answer's body ends (RFC 9112 §6.3).
#[derive(Debug, PartialEq, Eq)]
pub enum Framing {
    /// Read to its end.
    Done,
    /// This many bytes more.
    Length(u64),
    Chunked(Chunked),
    /// Until the API closes the connection.
    UntilClose,
}

/// One connection and what has been read from it and not yet used.
pub struct Conn {
    io: Io,
    buf: BytesMut,
    /// The timer of the route timeout, kept with the connection (see [`Conn::exchange`]); boxed
    /// so that a connection stays small as it moves between the pool, a call and its body.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Conn {
    pub fn new(io: MaybeHttps) -> Self {
        Self {
            io: io.into(),
            buf: BytesMut::new(),
            timer: None,
        }
    }

    /// Whether an idle connection can carry a request: still open, and nothing arrived on it
    /// since its last answer. Reads nothing from the socket unless it became readable.
    pub fn is_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut probe)
            .is_pending()
    }

    /// Sends `head` (a request without a body, see [`encode_head`]) and reads the head of its
    /// answer, skipping interim (1xx) answers, by `due` (the route's timeout; after it,
    /// [`Error::TimedOut`]). With `pass`, the fields tokengate does not inspect are kept out of
    /// the answer's map (see [`crate::proxy::passthrough`]).
    ///
    /// The timer lives with the connection and is moved to `due` only when it goes off early (it
    /// was set for an earlier call on this connection) or is set later than `due`: resetting a
    /// timer for every call costs more than reading the clock.
    pub async fn exchange(
        &mut self,
        head: &[u8],
        method: &Method,
        due: tokio::time::Instant,
        pass: bool,
    ) -> Result<(http::Response<()>, Framing, bool), Failed> {
        let Self { io, buf, timer } = self;
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() > due {
            timer.as_mut().reset(due);
        }
        let work = exchange(io, buf, head, method, pass);
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                done = &mut work => return done,
                () = timer.as_mut() => {
                    if !crate::went_off_early(timer.as_mut(), due) {
                        return Err(Failed {
                            error: Error::TimedOut,
                            retry: false,
                        });
                    }
                }
            }
        }
    }
}

/// [`Conn::exchange`] without the timeout.
async fn exchange(
    io: &mut Io,
    buf: &mut BytesMut,
    head: &[u8],
    method: &Method,
    pass: bool,
) -> Result<(http::Response<()>, Framing, bool), Failed> {
    let sent = async {
        io.write_all(head).await?;
        io.flush().await
    };
    if let Err(e) = sent.await {
        return Err(Failed {
            error: e.into(),
            retry: true,
        });
    }
    let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    let mut answered = false;
    loop {
        match parse_head(buf, method == Method::HEAD, pass) {
            Ok(Some(head)) => return Ok(head),
            Ok(None) => {}
            Err(error) => {
                return Err(Failed {
                    error,
                    retry: false,
                })
            }
        }
        if buf.len() >= MAX_HEAD {
            return Err(Failed {
                error: Error::Invalid("the head is too large"),
                retry: false,
            });
        }
        if buf.capacity() == 0 {
            *buf = crate::spare::take(HEAD_READ);
        } else {
            buf.reserve(HEAD_READ);
        }
        match io.read_buf(buf).await {
            Ok(0) if !answered => {
                return Err(Failed {
                    error: Error::Closed,
                    retry: safe,
                })
            }
            Ok(0) => {
                return Err(Failed {
                    error: Error::Invalid("the connection closed within the head"),
                    retry: false,
                })
            }
            Ok(_) => answered = true,
            Err(e) => {
                let reset = e.kind() == std::io::ErrorKind::ConnectionReset;
                return Err(Failed {
                    error: e.into(),
                    retry: safe && reset && !answered,
                });
            }
        }
    }
}

/// The head of a request without a body: `method target HTTP/1.1`, `host`, then every other
/// field of `headers` as is (their values cannot hold CR, LF or NUL). A method that defines a
/// body gets `content-length: 0` (RFC 9110 §8.6). `host` is written here, not looked up in the
/// map: putting it there costs a hash and an insert per call.
pub fn encode_head(
    method: &Method,
    target: &Uri,
    host: &HeaderValue,
    headers: &HeaderMap,
    added: &[u8],
) -> Vec<u8> {
    let target = target.path_and_query().map_or("/", |p| p.as_str());
    let fields: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    let mut out = Vec::with_capacity(
        method.as_str().len() + target.len() + host.len() + fields + added.len() + 48,
    );
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if name == header::HOST {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(added);
    if matches!(*method, Method::POST | Method::PUT | Method::PATCH)
        && !headers.contains_key(header::CONTENT_LENGTH)
    {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The first complete final answer head in `buf` (taken out of it), with its body's framing and
/// whether the connection may carry another request; `None` until the head is complete. With
/// `pass`, the fields tokengate does not inspect go into a [`passthrough::Passed`] extension
/// instead of the map (unless a `Connection` field names a field to drop: then all go into the
/// map).
fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
    pass: bool,
) -> Result<Option<(http::Response<()>, Framing, bool)>, Error> {
    loop {
        if buf.is_empty() {
            return Ok(None);
        }
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Error::Invalid(parse_error(e))),
        };
        let code = parsed.code.unwrap_or(0);
        let http11 = parsed.version == Some(1);
        let status = StatusCode::from_u16(code).map_err(|_| Error::Invalid("invalid status"))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(Error::Invalid("a protocol switch nobody asked for"));
            }
            // 100 Continue, 103 Early Hints: not forwarded.
            buf.advance(len);
            continue;
        }
        // Each name, and where its value is in `buf`: the values then share its memory once it
        // is frozen (no copy per value).
        let base = buf.as_ptr() as usize;
        let mut named = Vec::with_capacity(parsed.headers.len());
        let mut seen = Seen::default();
        let mut passed = pass.then(|| passthrough::Lines::with_capacity(len));
        // One round (two when fields were being passed on and a `Connection` field names one to
        // drop: only the map's rules drop it, so then every field goes into the map).
        'fields: loop {
            for f in parsed.headers.iter() {
                if let Some(lines) = passed.as_mut() {
                    if !passthrough::inspected(f.name.as_bytes()) {
                        lines.push(f.name.as_bytes(), f.value);
                        continue;
                    }
                }
                let name = HeaderName::from_bytes(f.name.as_bytes())
                    .map_err(|_| Error::Invalid("invalid field name"))?;
                let passing_connection = passed.is_some() && name == header::CONNECTION;
                if passing_connection && passthrough::lists_fields(f.value) {
                    (passed, seen) = (None, Seen::default());
                    named.clear();
                    continue 'fields;
                }
                seen.note(&name, f.value);
                if passing_connection {
                    // What it says is noted; the field (hop-by-hop, the proxy would drop it)
                    // goes nowhere.
                    continue;
                }
                let start = f.value.as_ptr() as usize - base;
                named.push((name, start, start + f.value.len()));
            }
            break;
        }
        let head = buf.split_to(len).freeze();
        // Passing fields on: room for those the proxy adds (`Cache-Control`, `X-Request-Id`,
        // `Set-Cookie`) without growing the map.
        let room = if passed.is_some() { 3 } else { 0 };
        let mut headers = crate::spare::map(named.len() + room);
        for (name, start, end) in named {
            let value = HeaderValue::from_maybe_shared(head.slice(start..end))
                .map_err(|_| Error::Invalid("invalid field value"))?;
            headers.append(name, value);
        }
        let (framing, keep) = framing(&mut headers, seen, status, head_request, http11)?;
        let mut response = http::Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = if http11 {
            http::Version::HTTP_11
        } else {
            http::Version::HTTP_10
        };
        *response.headers_mut() = headers;
        if let Some(lines) = passed {
            response.extensions_mut().insert(lines.done());
        }
        return Ok(Some((response, framing, keep)));
    }
}

/// How the body of an answer with `headers` ends, and whether its connection can be used again
/// (RFC 9112 §6.3, §9.3). Both `Transfer-Encoding` and `Content-Length`: the latter is dropped
/// and the connection closed after the answer.
fn framing(
    headers: &mut HeaderMap,
    seen: Seen,
    status: StatusCode,
    head_request: bool,
    http11: bool,
) -> Result<(Framing, bool), Error> {
    let mut keep = http11 && !seen.close;
    let mut length: Option<u64> = None;
    let lengths = seen.length.then(|| headers.get_all(header::CONTENT_LENGTH));
    for v in lengths.into_iter().flatten() {
        for n in v.as_bytes().split(|&b| b == b',') {
            let n = n.trim_ascii();
            if n.is_empty() || n.len() > 19 || !n.iter().all(u8::is_ascii_digit) {
                return Err(Error::Invalid("invalid Content-Length"));
            }
            let n: u64 = std::str::from_utf8(n)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or(Error::Invalid("invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Invalid("conflicting Content-Length"));
            }
            length = Some(n);
        }
    }
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Done, keep));
    }
    if seen.coding {
        let codings: Vec<&[u8]> = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .collect();
        let chunked = |c: &[u8]| c.eq_ignore_ascii_case(b"chunked");
        // chunked at most once, and last (RFC 9112 §6.1).
        if codings.iter().filter(|c| chunked(c)).count() > 1
            || codings.iter().rev().skip(1).any(|c| chunked(c))
        {
            return Err(Error::Invalid("chunked is not the last transfer coding"));
        }
        let chunked_last = codings.last().is_some_and(|c| chunked(c));
        if length.is_some() {
            headers.remove(header::CONTENT_LENGTH);
            keep = false;
        }
        return Ok(if chunked_last && http11 {
            (Framing::Chunked(Chunked::default()), keep)
        } else {
            (Framing::UntilClose, false)
        });
    }
    Ok(match length {
        Some(0) => (Framing::Done, keep),
        Some(n) => (Framing::Length(n), keep),
        None => (Framing::UntilClose, false),
    })
}

/// Which of the fields that decide an answer's framing it has (looked up only when present).
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    /// A `Connection` field lists `close`.
    close: bool,
    length: bool,
    coding: bool,
}

impl Seen {
    fn note(&mut self, name: &HeaderName, value: &[u8]) {
        if name == header::CONNECTION {
            self.close |= crate::proxy::headers::lists_close(value);
        } else if name == header::CONTENT_LENGTH {
            self.length = true;
        } else if name == header::TRANSFER_ENCODING {
            self.coding = true;
        }
    }
}

fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid field name",
        httparse::Error::HeaderValue => "invalid field value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token",
        httparse::Error::TooManyHeaders => "too many header fields",
        httparse::Error::Version => "not HTTP/1.x",
    }
}

/// Decoding of a chunked body (RFC 9112 §7.1), strictly: CRLF line ends, a hexadecimal size of
/// at most 16 digits, extensions and trailer fields read and dropped within bounds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chunked {
    state: ChunkState,
    trailer_bytes: usize,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// What decoding the buffered bytes gave.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Data(Bytes),
    End,
    More,
}

impl Chunked {
    fn step(&mut self, buf: &mut BytesMut) -> Result<Step, Error> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                        return Ok(Step::More);
                    };
                    let size = chunk_size(&line)?;
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(n).freeze();
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Step::Data(data));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        if buf.first().is_some_and(|&b| b != b'\r') {
                            return Err(Error::Invalid("a chunk without its CRLF"));
                        }
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Error::Invalid("a chunk without its CRLF"));
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let room = MAX_TRAILERS.saturating_sub(self.trailer_bytes);
                    let Some(line) = take_line(buf, room)? else {
                        return Ok(Step::More);
                    };
                    self.trailer_bytes += line.len() + 2;
                    if line.is_empty() {
                        return Ok(Step::End);
                    }
                }
            }
        }
    }
}

/// The next CRLF-ended line of `buf` (taken out, without its CRLF); `None` until it is complete.
fn take_line(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, Error> {
    let Some(lf) = memchr::memchr(b'\n', &buf[..buf.len().min(max)]) else {
        if buf.len() >= max {
            return Err(Error::Invalid("a chunked-framing line is too long"));
        }
        return Ok(None);
    };
    if lf == 0 || buf[lf - 1] != b'\r' {
        return Err(Error::Invalid("a bare LF in chunked framing"));
    }
    let line = buf.split_to(lf + 1).freeze();
    Ok(Some(line.slice(..lf - 1)))
}

/// `chunk-size [ chunk-ext ]` (RFC 9112 §7.1.1).
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    const BAD: Error = Error::Invalid("invalid chunk size");
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 16 {
        return Err(BAD);
    }
    let ext = line[digits..].trim_ascii_start();
    if !(ext.is_empty() || ext[0] == b';')
        || ext.iter().any(|&b| b.is_ascii_control() && b != b'\t')
    {
        return Err(BAD);
    }
    std::str::from_utf8(&line[..digits])
        .ok()
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or(BAD)
}

/// An answer's body, read from its connection as the browser's side takes it.
pub struct Answer {
    conn: Option<Conn>,
    framing: Framing,
    keep: bool,
}

impl Answer {
    pub fn new(conn: Conn, framing: Framing, keep: bool) -> Self {
        Self {
            conn: Some(conn),
            framing,
            keep,
        }
    }

    /// The connection, once the body has been read to its end, when it can carry another
    /// request; a spent one is closed here.
    pub fn take_idle(&mut self) -> Option<Conn> {
        if self.framing != Framing::Done {
            return None;
        }
        let mut conn = self.conn.take()?;
        if !self.keep || !conn.buf.is_empty() {
            return None;
        }
        // Idle in the pool without a read buffer (8 KB per pooled connection otherwise); the
        // next call takes one as it reads the answer ([`crate::spare`]).
        crate::spare::give_back(std::mem::take(&mut conn.buf));
        Some(conn)
    }

    pub fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }

    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let buf = &mut conn.buf;
            let data = match &mut self.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(left) if !buf.is_empty() => {
                    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                    *left -= n as u64;
                    if *left == 0 {
                        self.framing = Framing::Done;
                    }
                    Some(buf.split_to(n).freeze())
                }
                Framing::UntilClose if !buf.is_empty() => Some(buf.split().freeze()),
                Framing::Chunked(c) => match c.step(buf) {
                    Ok(Step::Data(d)) => Some(d),
                    Ok(Step::End) => {
                        self.framing = Framing::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Step::More) => None,
                    Err(e) => return self.fail(e),
                },
                Framing::Length(_) | Framing::UntilClose => None,
            };
            if let Some(d) = data {
                return Poll::Ready(Some(Ok(Frame::data(d))));
            }
            buf.reserve(BODY_READ);
            let read = pin!(conn.io.read_buf(buf)).poll(cx);
            match read {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if self.framing == Framing::UntilClose => {
                    self.framing = Framing::Done;
                    self.keep = false;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    return self.fail(Error::Invalid("the connection closed within the body"))
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return self.fail(e.into()),
            }
        }
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.framing = Framing::Done;
        self.keep = false;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The status, framing and keep-alive of `raw`'s head; the same whether the fields no rule
    /// reads are passed on or put into the map (checked here for every case).
    fn head(raw: &str, head_request: bool) -> Result<Option<(u16, Framing, bool)>, Error> {
        let read = |pass| {
            let mut buf = BytesMut::from(raw);
            parse_head(&mut buf, head_request, pass)
                .map(|h| h.map(|(r, f, k)| (r.status().as_u16(), f, k)))
        };
        let (mapped, passed) = (read(false), read(true));
        assert_eq!(
            format!("{mapped:?}"),
            format!("{passed:?}"),
            "passing fields on changed how {raw:?} is read"
        );
        mapped
    }

    /// Every field of `r` (map, then passed lines), sorted, as `(lower-case name, value)`.
    fn all_fields(r: http::Response<()>) -> Vec<(String, Vec<u8>)> {
        let r = passthrough::expanded(r);
        let mut all: Vec<_> = r
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect();
        all.sort();
        all
    }

    #[test]
    fn fields_no_rule_reads_are_passed_on_as_they_came() {
        let raw = "HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 07 Dec 2026 18:00:00 GMT\r\n\
                   Content-Type: application/json\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\
                   Keep-Alive: timeout=5\r\nCache-Control: max-age=60\r\nSet-Cookie: a=1\r\n\
                   SET-COOKIE: tg_session=x\r\nX-Request-Id: api-1\r\nETag: \"v1\"\r\n\
                   X-A: 1\r\nx-a: caf\u{e9}\r\nX-Empty:\r\n\r\n{}";
        let mut buf = BytesMut::from(raw);
        let (r, f, keep) = parse_head(&mut buf, false, true)
            .expect("ok")
            .expect("complete");
        assert_eq!((f, keep), (Framing::Length(2), true));
        let mut mapped: Vec<_> = r
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        mapped.sort();
        assert_eq!(
            mapped,
            [
                ("cache-control", &b"max-age=60"[..]),
                ("content-length", b"2"),
                ("keep-alive", b"timeout=5"),
                ("set-cookie", b"a=1"),
                ("set-cookie", b"tg_session=x"),
                ("x-request-id", b"api-1"),
            ],
            "the map holds what the rules read, replace or drop (a `Connection` of only \
             keep-alive goes nowhere: it is noted)"
        );
        let passed = r.extensions().get::<passthrough::Passed>().expect("passed");
        assert_eq!(
            passed.lines(),
            "Server: nginx\r\nDate: Mon, 07 Dec 2026 18:00:00 GMT\r\nContent-Type: application/json\r\n\
             ETag: \"v1\"\r\nX-A: 1\r\nx-a: caf\u{e9}\r\nX-Empty: \r\n"
                .as_bytes()
        );
        assert!(passed.dated());
        assert_eq!(&buf[..], b"{}", "the body start stays in the buffer");
        // Put back into the map, the answer has every field it has when nothing is passed on,
        // once the proxy has dropped the hop-by-hop ones.
        let mut again = BytesMut::from(raw);
        let (plain, _, _) = parse_head(&mut again, false, false)
            .expect("ok")
            .expect("complete");
        assert!(plain.extensions().get::<passthrough::Passed>().is_none());
        assert!(plain.headers().contains_key(header::CONNECTION));
        let forwarded = |r: http::Response<()>| {
            let mut r = passthrough::expanded(r);
            crate::proxy::headers::strip_hop_by_hop(r.headers_mut());
            all_fields(r)
        };
        assert_eq!(forwarded(r), forwarded(plain));
        // `Connection: close` is noted the same way: the connection is not used again.
        for close in ["close", "Keep-Alive, CLOSE"] {
            let raw =
                format!("HTTP/1.1 200 OK\r\nConnection: {close}\r\nContent-Length: 0\r\n\r\n");
            for pass in [false, true] {
                let mut buf = BytesMut::from(raw.as_str());
                let (r, f, keep) = parse_head(&mut buf, false, pass)
                    .expect("ok")
                    .expect("complete");
                assert_eq!((f, keep), (Framing::Done, false), "{close} {pass}");
                assert_eq!(
                    r.headers().contains_key(header::CONNECTION),
                    !pass,
                    "{close}"
                );
            }
        }
    }

    #[test]
    fn a_connection_field_naming_others_keeps_every_field_in_the_map() {
        for connection in ["x-hop", "close, X-Hop", "keep-alive,te"] {
            let raw = format!(
                "HTTP/1.1 200 OK\r\nServer: nginx\r\nConnection: {connection}\r\nX-Hop: 1\r\n\
                 Content-Length: 0\r\n\r\n"
            );
            let mut buf = BytesMut::from(raw.as_str());
            let (r, _, _) = parse_head(&mut buf, false, true)
                .expect("ok")
                .expect("complete");
            assert!(
                r.extensions().get::<passthrough::Passed>().is_none(),
                "{connection}"
            );
            assert_eq!(r.headers()["x-hop"], "1", "{connection}");
            assert_eq!(r.headers()["server"], "nginx", "{connection}");
        }
    }

    #[test]
    fn framing_of_answers() {
        let ok = "HTTP/1.1 200 OK\r\n";
        let cases: &[(&str, bool, (u16, Framing, bool))] = &[
            (
                "Content-Length: 5\r\n\r\n",
                false,
                (200, Framing::Length(5), true),
            ),
            (
                "Content-Length: 5, 5\r\n\r\n",
                false,
                (200, Framing::Length(5), true),
            ),
            (
                "Content-Length: 0\r\n\r\n",
                false,
                (200, Framing::Done, true),
            ),
            (
                "Content-Length: 5\r\n\r\n",
                true,
                (200, Framing::Done, true),
            ),
            ("\r\n", false, (200, Framing::UntilClose, false)),
            (
                "Connection: keep-alive, Close\r\nContent-Length: 1\r\n\r\n",
                false,
                (200, Framing::Length(1), false),
            ),
            (
                "Transfer-Encoding: chunked\r\n\r\n",
                false,
                (200, Framing::Chunked(Chunked::default()), true),
            ),
            (
                "Transfer-Encoding: gzip, Chunked\r\n\r\n",
                false,
                (200, Framing::Chunked(Chunked::default()), true),
            ),
            // TE wins over CL, and the connection is not used again.
            (
                "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                (200, Framing::Chunked(Chunked::default()), false),
            ),
            (
                "Transfer-Encoding: gzip\r\n\r\n",
                false,
                (200, Framing::UntilClose, false),
            ),
        ];
        for (fields, head_request, want) in cases {
            let got = head(&format!("{ok}{fields}"), *head_request)
                .expect(fields)
                .expect(fields);
            assert_eq!(&got, want, "{fields}");
        }
        let no_body = head("HTTP/1.1 204 No Content\r\n\r\n", false)
            .expect("204")
            .expect("204");
        assert_eq!(no_body, (204, Framing::Done, true));
        let http10 = head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false)
            .expect("1.0")
            .expect("1.0");
        assert_eq!(http10, (200, Framing::Length(1), false));
        // Interim answers are skipped; a partial head waits for more.
        let interim = head("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nhi", false);
        assert_eq!(interim.expect("1xx"), Some((201, Framing::Length(2), true)));
        assert!(head("HTTP/1.1 200 OK\r\nContent-Le", false)
            .expect("partial")
            .is_none());
    }

    #[test]
    fn malformed_answers_are_refused() {
        for raw in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 40\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-Nul: a\0b\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            "HTTP/1.1 999999 OK\r\n\r\n",
            "HTTP/2 200 OK\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(head(raw, false).is_err(), "accepted: {raw:?}");
        }
    }

    #[test]
    fn field_values_keep_their_bytes() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 200 OK\r\nX-A: 1\r\nx-a: 2\r\nX-Bin: caf\u{e9}\r\nContent-Length: 3\r\n\r\nabc",
        );
        let (r, f, _) = parse_head(&mut buf, false, false)
            .expect("ok")
            .expect("complete");
        let all: Vec<_> = r.headers().get_all("x-a").iter().collect();
        assert_eq!(all, ["1", "2"]);
        assert_eq!(r.headers()["x-bin"].as_bytes(), "caf\u{e9}".as_bytes());
        assert_eq!(f, Framing::Length(3));
        assert_eq!(&buf[..], b"abc", "the body start stays in the buffer");
    }

    fn dechunk(raw: &[u8], piece: usize) -> Result<(Vec<u8>, Vec<u8>), Error> {
        let mut c = Chunked::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        for part in raw.chunks(piece.max(1)) {
            buf.extend_from_slice(part);
            fed += part.len();
            loop {
                match c.step(&mut buf)? {
                    Step::Data(d) => out.extend_from_slice(&d),
                    Step::More => break,
                    Step::End => return Ok((out, [&buf[..], &raw[fed..]].concat())),
                }
            }
        }
        Err(Error::Invalid("unfinished"))
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_sizes() {
        let raw = b"5;name=\"v\"\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Sum: 1\r\n\r\nNEXT";
        for piece in [1, 2, 3, 7, raw.len()] {
            let (body, rest) = dechunk(raw, piece).expect("valid");
            assert_eq!(body, b"helloabcdefghijklmnopqrstuvwxyz", "piece {piece}");
            assert_eq!(rest, b"NEXT", "what follows the body stays buffered");
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for raw in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"g\r\n",
            b"\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"5;a\0b\r\nhello\r\n0\r\n\r\n",
            b"0\r\nX: 1\n\r\n",
        ] {
            assert!(
                dechunk(raw, raw.len()).is_err(),
                "accepted: {:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let long = format!("5;{}\r\nhello\r\n0\r\n\r\n", "x".repeat(MAX_CHUNK_LINE));
        assert!(dechunk(long.as_bytes(), 100).is_err());
        let trailers = format!("0\r\n{}\r\n\r\n", "X: y\r\n".repeat(MAX_TRAILERS / 6 + 1));
        assert!(dechunk(trailers.as_bytes(), 1000).is_err());
        // Sizes up to 16 hex digits parse (the data just never comes).
        assert!(matches!(
            dechunk(b"ffffffffffffffff\r\nab", 64),
            Err(Error::Invalid("unfinished"))
        ));
    }

    #[test]
    fn request_heads() {
        let host = HeaderValue::from_static("api:80");
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("1"));
        // A Host left in the map is not written twice: the route's is the one.
        h.insert(header::HOST, HeaderValue::from_static("browser.example"));
        h.append("x-a", HeaderValue::from_static("2"));
        let target: Uri = "/v1/x?q=1".parse().expect("uri");
        let added = b"authorization: Bearer t\r\n";
        let get = encode_head(&Method::GET, &target, &host, &h, added);
        assert_eq!(
            String::from_utf8(get).expect("utf8"),
            "GET /v1/x?q=1 HTTP/1.1\r\nhost: api:80\r\nx-a: 1\r\nx-a: 2\r\n\
             authorization: Bearer t\r\n\r\n"
        );
        let post = encode_head(
            &Method::POST,
            &"/".parse().expect("uri"),
            &host,
            &HeaderMap::new(),
            b"",
        );
        assert_eq!(
            post,
            b"POST / HTTP/1.1\r\nhost: api:80\r\ncontent-length: 0\r\n\r\n"
        );
    }
}
