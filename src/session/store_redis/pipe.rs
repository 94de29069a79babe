//! The session read every API call makes with the Redis store (`HMGET`), over connections of our
//! own instead of the `redis` crate's.
//!
//! Why: measured with callgrind (`bench/instructions.sh`), a read through the crate's multiplexed
//! connection cost ~16,000 instructions: a channel to the connection's driver task and a oneshot
//! back, a timer of its own besides ours, a parser combinator building a `Value`: a third of what
//! tokengate spent on a whole proxied call. Here a call writes its command and whichever waiting
//! call is polled reads the socket and hands each answer to its caller, in order (Redis answers a
//! connection's commands in the order sent); no task, no channel.
//!
//! Only where it does what the crate would: a plain-TCP `redis://` server, RESP2 (no `HELLO` is
//! sent), `AUTH` and `SELECT` from the URL. A server that answers `MOVED`/`ASK` (a cluster node)
//! turns it off for good and the crate reads instead; TLS, clusters, writes, scripts and the
//! invalidation subscription stay with the crate. One connection per thread, as the crate's
//! ([`super::RedisStore`]): the binary's workers each run their own event loop.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A bulk string longer than this is taken for a broken stream (a session is a few KB).
const MAX_BULK: usize = 16 << 20;
/// A line (a status, an error, a length) longer than this without its end, likewise.
const MAX_LINE: usize = 64 << 10;
/// Arrays longer or nested deeper than this are taken for a broken stream (`HMGET` answers two).
const MAX_ARRAY: usize = 1024;
const MAX_DEPTH: usize = 4;

/// One RESP2 answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Status(Vec<u8>),
    /// `-ERR ...`: the command failed.
    Error(String),
    Int(i64),
    /// `$-1` is `None`.
    Bulk(Option<Vec<u8>>),
    /// `*-1` is `None`.
    Array(Option<Vec<Reply>>),
}

/// Bytes that are not RESP2.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

/// The next answer in `buf` and the bytes it took, `None` when it has not all arrived yet.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, Malformed> {
    parse_at(buf, 0, 0)
}

fn parse_at(buf: &[u8], at: usize, depth: usize) -> Result<Option<(Reply, usize)>, Malformed> {
    let Some(line_end) = find_crlf(buf, at + 1) else {
        return if buf.len().saturating_sub(at) > MAX_LINE {
            Err(Malformed)
        } else {
            Ok(None)
        };
    };
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let line = &buf[at + 1..line_end];
    let next = line_end + 2;
    match kind {
        b'+' => Ok(Some((Reply::Status(line.to_vec()), next))),
        b'-' => Ok(Some((
            Reply::Error(String::from_utf8_lossy(line).into_owned()),
            next,
        ))),
        b':' => Ok(Some((Reply::Int(int(line)?), next))),
        b'$' => {
            let len = int(line)?;
            if len == -1 {
                return Ok(Some((Reply::Bulk(None), next)));
            }
            let len = usize::try_from(len).map_err(|_| Malformed)?;
            if len > MAX_BULK {
                return Err(Malformed);
            }
            let end = next + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(Malformed);
            }
            Ok(Some((Reply::Bulk(Some(buf[next..end].to_vec())), end + 2)))
        }
        b'*' => {
            let len = int(line)?;
            if len == -1 {
                return Ok(Some((Reply::Array(None), next)));
            }
            let len = usize::try_from(len).map_err(|_| Malformed)?;
            if len > MAX_ARRAY || depth >= MAX_DEPTH {
                return Err(Malformed);
            }
            let mut items = Vec::with_capacity(len);
            let mut at = next;
            for _ in 0..len {
                match parse_at(buf, at, depth + 1)? {
                    Some((item, after)) => {
                        items.push(item);
                        at = after;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(Some(items)), at)))
        }
        _ => Err(Malformed),
    }
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    let rest = buf.get(from..)?;
    let i = memchr::memchr(b'\r', rest)?;
    match rest.get(i + 1) {
        Some(b'\n') => Some(from + i),
        // A CR not followed by LF ends no RESP line: let the length check decide.
        Some(_) => None,
        None => None,
    }
}

/// A RESP integer: optional `-`, then 1 to 19 digits.
fn int(line: &[u8]) -> Result<i64, Malformed> {
    let (neg, digits) = match line.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, line),
    };
    if digits.is_empty() || digits.len() > 19 {
        return Err(Malformed);
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(Malformed);
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(i64::from(d - b'0')))
            .ok_or(Malformed)?;
    }
    Ok(if neg { -n } else { n })
}

/// Appends `args` as one RESP command (an array of bulk strings).
pub fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    array(out, args.len());
    for a in args {
        bulk(out, a);
    }
}

fn array(out: &mut Vec<u8>, len: usize) {
    out.push(b'*');
    decimal(out, len);
    out.extend_from_slice(b"\r\n");
}

fn bulk(out: &mut Vec<u8>, a: &[u8]) {
    out.push(b'$');
    decimal(out, a.len());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(a);
    out.extend_from_slice(b"\r\n");
}

/// `n` in decimal (`write!` went through the formatting machinery: ~1,500 instructions a
/// command).
fn decimal(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Where a call's answer stands.
enum Slot {
    /// Not answered yet; the waker of the task waiting for it.
    Waiting(Option<Waker>),
    Answered(Result<Reply, String>),
    /// Taken, or its caller is gone (an answer still to come is dropped).
    Done,
}

/// One connection.
struct Pipe {
    state: Mutex<State>,
}

struct State {
    stream: TcpStream,
    /// Commands not yet written.
    out: Vec<u8>,
    /// Bytes read and not yet parsed.
    input: Vec<u8>,
    /// The calls from number `base` on, in the order their answers will come.
    slots: VecDeque<Slot>,
    base: u64,
    /// How many answers have arrived (the next one is for call number `answered`).
    answered: u64,
    /// The call whose task is registered for the socket's readiness: when it ends, another
    /// waiting call must be registered instead, or nobody would be woken when answers arrive.
    reader: Option<u64>,
    /// The call that will write what `out` holds at its next poll (see [`Call::poll`]).
    flusher: Option<u64>,
    /// Why the connection is no longer used.
    broken: Option<String>,
}

impl State {
    fn slot(&mut self, seq: u64) -> Option<&mut Slot> {
        let i = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        self.slots.get_mut(i)
    }

    fn deliver(&mut self, reply: Reply) {
        let seq = self.answered;
        self.answered += 1;
        if let Some(slot) = self.slot(seq) {
            if let Slot::Waiting(w) = slot {
                let w = w.take();
                *slot = Slot::Answered(Ok(reply));
                if let Some(w) = w {
                    w.wake();
                }
            }
        }
        self.trim();
    }

    fn trim(&mut self) {
        while matches!(self.slots.front(), Some(Slot::Done)) {
            self.slots.pop_front();
            self.base += 1;
        }
    }

    /// Every waiting call gets `why`; nothing more is written or read.
    fn breaks(&mut self, why: String) {
        for slot in &mut self.slots {
            if let Slot::Waiting(w) = slot {
                let w = w.take();
                *slot = Slot::Answered(Err(why.clone()));
                if let Some(w) = w {
                    w.wake();
                }
            }
        }
        self.broken = Some(why);
        self.reader = None;
        self.flusher = None;
        self.out.clear();
        self.input.clear();
    }

    /// Call `seq` ends (answered, or its caller gone). If its task was the one registered for
    /// the socket's readiness, the first call still waiting is registered in its place.
    fn end(&mut self, seq: u64) {
        if let Some(slot) = self.slot(seq) {
            *slot = Slot::Done;
        }
        self.trim();
        let was_reader = self.reader == Some(seq);
        let was_flusher = self.flusher == Some(seq);
        if !was_reader && !was_flusher {
            return;
        }
        if was_flusher {
            // Gone before writing the commands it was to write: the next call polled does.
            self.flusher = None;
        }
        if was_reader {
            self.reader = None;
        }
        let base = self.base;
        let Some((i, w)) = self.slots.iter().enumerate().find_map(|(i, s)| match s {
            Slot::Waiting(Some(w)) => Some((i, w.clone())),
            _ => None,
        }) else {
            return;
        };
        if was_reader && self.out.is_empty() && self.broken.is_none() {
            // Registered with that task's waker, without waking it: it is woken when answers
            // arrive, as if it had polled last.
            let mut cx = Context::from_waker(&w);
            if self.stream.poll_read_ready(&mut cx).is_pending() {
                self.reader = Some(base + i as u64);
                return;
            }
        }
        // Something to read or write already: that task does it.
        w.wake();
    }

    fn write(&mut self, seq: u64, cx: &mut Context<'_>) {
        while !self.out.is_empty() && self.broken.is_none() {
            match pin!(self.stream.write(&self.out)).poll(cx) {
                Poll::Ready(Ok(0)) => self.breaks("write: the connection is closed".into()),
                Poll::Ready(Ok(n)) => {
                    self.out.drain(..n);
                }
                Poll::Ready(Err(e)) => self.breaks(format!("write: {e}")),
                Poll::Pending => {
                    self.reader = Some(seq);
                    return;
                }
            }
        }
    }

    /// Reads what arrived and hands out the answers in it, until the socket has nothing more.
    /// tokio's `read_buf`, not `try_read_buf`: a read that leaves room in the buffer drained the
    /// socket and tokio forgets the readiness, so the next wait costs no `recvfrom` that finds
    /// nothing (as in the server loop, `server/h1.rs`).
    fn read(&mut self, seq: u64, cx: &mut Context<'_>) {
        while self.broken.is_none() {
            if self.input.capacity() - self.input.len() < 1024 {
                self.input.reserve(8192);
            }
            match pin!(self.stream.read_buf(&mut self.input)).poll(cx) {
                Poll::Pending => {
                    self.reader = Some(seq);
                    return;
                }
                Poll::Ready(Ok(0)) => self.breaks("the server closed the connection".into()),
                Poll::Ready(Ok(_)) => self.parse_all(),
                Poll::Ready(Err(e)) => self.breaks(format!("read: {e}")),
            }
        }
    }

    fn parse_all(&mut self) {
        let mut at = 0;
        loop {
            match parse(&self.input[at..]) {
                Ok(Some((reply, n))) => {
                    at += n;
                    self.deliver(reply);
                }
                Ok(None) => break,
                Err(Malformed) => {
                    self.breaks("the server's answer is not RESP".into());
                    return;
                }
            }
        }
        if at == self.input.len() {
            self.input.clear();
        } else {
            self.input.drain(..at);
        }
    }
}

impl Pipe {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `cmd` (one command, RESP-encoded) and waits for its answer; `Err` when the
    /// connection broke (it is then not used again).
    async fn call(&self, cmd: &[u8]) -> Result<Reply, String> {
        let seq = {
            let mut st = self.lock();
            if let Some(why) = &st.broken {
                return Err(why.clone());
            }
            st.out.extend_from_slice(cmd);
            st.slots.push_back(Slot::Waiting(None));
            st.base + st.slots.len() as u64 - 1
        };
        let mut call = Call {
            pipe: self,
            seq,
            ended: false,
            yielded: false,
        };
        poll_fn(|cx| call.poll(cx)).await
    }
}

/// A call in flight; dropped before its answer (a timeout, a request cancelled), its answer is
/// dropped when it comes.
struct Call<'a> {
    pipe: &'a Pipe,
    seq: u64,
    ended: bool,
    /// Has let the other calls of its turn add their commands.
    yielded: bool,
}

impl Call<'_> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Reply, String>> {
        let mut st = self.pipe.lock();
        if let Some(r) = self.take(&mut st) {
            return Poll::Ready(r);
        }
        match st.flusher {
            None if !self.yielded
                && st.slots.iter().any(|s| matches!(s, Slot::Waiting(Some(_)))) =>
            {
                // Other calls are waiting, so others are likely being made in this same turn
                // of the event loop: let them add their commands first, then write them all at
                // once (one write here and one read in Redis, instead of one per call; the
                // crate's driver task batched them likewise).
                st.flusher = Some(self.seq);
                self.yielded = true;
                self.wait(&mut st, cx);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Some(f) if f != self.seq => {}
            _ => {
                st.flusher = None;
                st.write(self.seq, cx);
            }
        }
        st.read(self.seq, cx);
        if let Some(r) = self.take(&mut st) {
            return Poll::Ready(r);
        }
        self.wait(&mut st, cx);
        Poll::Pending
    }

    /// Keeps this task's waker for the answer.
    fn wait(&self, st: &mut State, cx: &Context<'_>) {
        if let Some(Slot::Waiting(w)) = st.slot(self.seq) {
            match w {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *w = Some(cx.waker().clone()),
            }
        }
    }

    fn take(&mut self, st: &mut State) -> Option<Result<Reply, String>> {
        let slot = st.slot(self.seq)?;
        if !matches!(slot, Slot::Answered(_)) {
            return None;
        }
        let Slot::Answered(r) = std::mem::replace(slot, Slot::Done) else {
            return None;
        };
        self.ended = true;
        st.end(self.seq);
        Some(r)
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.pipe.lock().end(self.seq);
        }
    }
}

/// How a call on one connection failed.
enum Failed {
    /// The connection broke (closed, reset, not RESP).
    Broke(String),
    TimedOut,
}

/// Why a read went nowhere.
#[derive(Debug)]
pub enum ReadError {
    /// Unreachable, timed out, refused, or an error answer.
    Unavailable(String),
    /// The server is a cluster node that does not hold the key: the crate reads instead.
    NotHere,
}

/// The reads of one Redis store: per-thread connections to one server.
pub struct Reads {
    host: String,
    port: u16,
    /// `AUTH [username] password`, already encoded (never logged).
    auth: Option<Vec<u8>>,
    /// `SELECT db`, already encoded, when the URL names a database other than 0.
    select: Option<Vec<u8>>,
    pipes: super::PerThread<Arc<Pipe>>,
    /// Held while connecting, so that concurrent first calls on a thread make one connection.
    connecting: tokio::sync::Mutex<()>,
    /// A `MOVED`/`ASK` answer was seen: the server is a cluster node, these reads are off.
    off: AtomicBool,
}

impl std::fmt::Debug for Reads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reads({}:{})", self.host, self.port)
    }
}

impl Reads {
    /// Reads for `info`'s server, or `None` when it is not one these reads serve (TLS, a Unix
    /// socket): the crate does them all then.
    pub fn new(info: &redis::ConnectionInfo) -> Option<Self> {
        let redis::ConnectionAddr::Tcp(host, port) = &info.addr else {
            return None;
        };
        let r = &info.redis;
        let auth = r.password.as_ref().map(|p| {
            let mut cmd = Vec::new();
            match &r.username {
                Some(u) => command(&mut cmd, &[b"AUTH", u.as_bytes(), p.as_bytes()]),
                None => command(&mut cmd, &[b"AUTH", p.as_bytes()]),
            }
            cmd
        });
        let select = (r.db != 0).then(|| {
            let mut cmd = Vec::new();
            command(&mut cmd, &[b"SELECT", r.db.to_string().as_bytes()]);
            cmd
        });
        Some(Self {
            host: host.clone(),
            port: *port,
            auth,
            select,
            pipes: super::PerThread::default(),
            connecting: tokio::sync::Mutex::new(()),
            off: AtomicBool::new(false),
        })
    }

    /// False once the server turned out to be a cluster node.
    pub fn on(&self) -> bool {
        !self.off.load(Ordering::Relaxed)
    }

    /// Forgets `pipe` (broken, or timed out): the next call connects anew.
    fn forget(&self, pipe: &Arc<Pipe>) {
        self.pipes.remove(|p| Arc::ptr_eq(p, pipe));
    }

    /// This thread's connection, and whether it was made for this call (by `deadline`).
    async fn pipe(&self, deadline: tokio::time::Instant) -> Result<(Arc<Pipe>, bool), ReadError> {
        if let Some(p) = self.pipes.get() {
            return Ok((p, false));
        }
        let timed_out = || ReadError::Unavailable("connect timed out".into());
        let _connecting = tokio::time::timeout_at(deadline, self.connecting.lock())
            .await
            .map_err(|_| timed_out())?;
        if let Some(p) = self.pipes.get() {
            return Ok((p, false));
        }
        let pipe = tokio::time::timeout_at(deadline, self.connect())
            .await
            .map_err(|_| timed_out())??;
        let pipe = Arc::new(pipe);
        self.pipes.set(Arc::clone(&pipe));
        Ok((pipe, true))
    }

    /// `cmd` on `pipe`, by `deadline`. A connection that broke, or whose call went unanswered
    /// for long, is forgotten: the next call connects anew.
    async fn call_on(
        &self,
        pipe: &Arc<Pipe>,
        cmd: &[u8],
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<Reply, Failed> {
        let sent = tokio::time::Instant::now();
        match tokio::time::timeout_at(deadline, pipe.call(cmd)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(why)) => {
                self.forget(pipe);
                Err(Failed::Broke(why))
            }
            Err(_) => {
                // A server that stopped answering (or a connection lost without a word): the
                // answers still to come are not waited for. Not when the call had little time
                // left when it began (a slow connect before it): the connection may be fine.
                if deadline.saturating_duration_since(sent) >= timeout / 2 {
                    pipe.lock().breaks("timed out".into());
                    self.forget(pipe);
                }
                Err(Failed::TimedOut)
            }
        }
    }

    async fn connect(&self) -> Result<Pipe, ReadError> {
        let stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| ReadError::Unavailable(format!("connect: {e}")))?;
        // Commands are small and answered before the next: no Nagle delay.
        let _ = stream.set_nodelay(true);
        let pipe = Pipe {
            state: Mutex::new(State {
                stream,
                out: Vec::with_capacity(256),
                input: Vec::with_capacity(8192),
                slots: VecDeque::with_capacity(16),
                base: 0,
                answered: 0,
                reader: None,
                flusher: None,
                broken: None,
            }),
        };
        for (what, cmd) in [("AUTH", &self.auth), ("SELECT", &self.select)] {
            let Some(cmd) = cmd else { continue };
            match pipe.call(cmd).await {
                Ok(Reply::Status(_)) => {}
                // The server's own words (e.g. WRONGPASS), never the password.
                Ok(Reply::Error(e)) => return Err(ReadError::Unavailable(format!("{what}: {e}"))),
                Ok(other) => {
                    return Err(ReadError::Unavailable(format!(
                        "{what}: unexpected answer {}",
                        kind(&other)
                    )))
                }
                Err(e) => return Err(ReadError::Unavailable(e)),
            }
        }
        Ok(pipe)
    }

    /// `HMGET key fields...` on this thread's connection, bounded by `timeout` (connecting
    /// included): each field's value, `None` where it (or the key) does not exist.
    pub async fn hmget(
        &self,
        key: &[u8],
        fields: &[&[u8]],
        timeout: Duration,
    ) -> Result<Vec<Option<Vec<u8>>>, ReadError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut cmd = Vec::with_capacity(64 + key.len());
        array(&mut cmd, 2 + fields.len());
        bulk(&mut cmd, b"HMGET");
        bulk(&mut cmd, key);
        for f in fields {
            bulk(&mut cmd, f);
        }
        let (pipe, fresh) = self.pipe(deadline).await?;
        let answer = match self.call_on(&pipe, &cmd, deadline, timeout).await {
            // A kept connection found closed (the server's idle `timeout`, a proxy, a restart):
            // once more on a new one. A read changes nothing, so asking again is safe.
            Err(Failed::Broke(_)) if !fresh => {
                let (pipe, _) = self.pipe(deadline).await?;
                self.call_on(&pipe, &cmd, deadline, timeout).await
            }
            other => other,
        };
        let answer = match answer {
            Ok(a) => Ok(a),
            Err(Failed::Broke(why)) => Err(why),
            Err(Failed::TimedOut) => Err("call timed out".to_string()),
        };
        match answer.map_err(ReadError::Unavailable)? {
            Reply::Array(Some(items)) if items.len() == fields.len() => items
                .into_iter()
                .map(|i| match i {
                    Reply::Bulk(v) => Ok(v),
                    other => Err(ReadError::Unavailable(format!(
                        "HMGET: unexpected item {}",
                        kind(&other)
                    ))),
                })
                .collect(),
            Reply::Error(e) if e.starts_with("MOVED ") || e.starts_with("ASK ") => {
                self.off.store(true, Ordering::Relaxed);
                Err(ReadError::NotHere)
            }
            Reply::Error(e) => Err(ReadError::Unavailable(e)),
            other => Err(ReadError::Unavailable(format!(
                "HMGET: unexpected answer {}",
                kind(&other)
            ))),
        }
    }
}

/// An answer's type, for errors (its content may be a secret).
fn kind(r: &Reply) -> &'static str {
    match r {
        Reply::Status(_) => "status",
        Reply::Error(_) => "error",
        Reply::Int(_) => "integer",
        Reply::Bulk(_) => "bulk string",
        Reply::Array(_) => "array",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_and_say_how_many_bytes_they_took() {
        let cases: [(&[u8], Reply); 8] = [
            (b"+OK\r\n", Reply::Status(b"OK".to_vec())),
            (b"-ERR no\r\n", Reply::Error("ERR no".into())),
            (b":-42\r\n", Reply::Int(-42)),
            (b"$3\r\na\r\n\r\n", Reply::Bulk(Some(b"a\r\n".to_vec()))),
            (b"$0\r\n\r\n", Reply::Bulk(Some(Vec::new()))),
            (b"$-1\r\n", Reply::Bulk(None)),
            (b"*-1\r\n", Reply::Array(None)),
            (
                b"*2\r\n$1\r\n7\r\n$-1\r\n",
                Reply::Array(Some(vec![
                    Reply::Bulk(Some(b"7".to_vec())),
                    Reply::Bulk(None),
                ])),
            ),
        ];
        for (bytes, want) in cases {
            let mut buf = bytes.to_vec();
            buf.extend_from_slice(b"+NEXT\r\n");
            assert_eq!(parse(&buf), Ok(Some((want, bytes.len()))), "{bytes:?}");
            // Every proper prefix is incomplete, never an error or a wrong answer.
            for cut in 0..bytes.len() {
                assert_eq!(parse(&bytes[..cut]), Ok(None), "{bytes:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn what_is_not_resp_is_refused() {
        let bad: [&[u8]; 10] = [
            b"?x\r\n",
            b":12a\r\n",
            b":\r\n",
            b":99999999999999999999\r\n",
            b"$-2\r\n",
            b"$3\r\nabcd\r\n",
            b"$99999999999\r\n",
            b"*-5\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
            &[b'+'; MAX_LINE + 2],
        ];
        for b in bad {
            assert_eq!(parse(b), Err(Malformed), "{b:?}");
        }
    }

    #[test]
    fn lengths_are_written_in_decimal() {
        for n in [0, 1, 9, 10, 99, 100, 1491, 65_536, usize::MAX] {
            let mut out = Vec::new();
            decimal(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
        }
    }

    #[test]
    fn a_command_is_an_array_of_bulk_strings_that_parses_back() {
        let mut cmd = Vec::new();
        command(&mut cmd, &[b"HMGET", b"tg:{a b}:s", b"g", b""]);
        assert_eq!(
            cmd,
            b"*4\r\n$5\r\nHMGET\r\n$10\r\ntg:{a b}:s\r\n$1\r\ng\r\n$0\r\n\r\n".to_vec()
        );
        let (reply, n) = parse(&cmd).expect("RESP").expect("complete");
        assert_eq!(n, cmd.len());
        assert!(matches!(reply, Reply::Array(Some(items)) if items.len() == 4));
    }

    /// How the fake server answers.
    #[derive(Clone, Copy)]
    enum Fake {
        /// `HMGET key f1 f2` → `[key, nil]`, one byte per write.
        Echo,
        /// Bytes that are not RESP, then the next connection echoes.
        GarbageOnce,
        /// Closes the first connection after reading a command, then echoes.
        CloseOnce,
        /// Echoes, and closes the first connection after its first answer (an idle timeout).
        CloseAfterAnswer,
        /// `-MOVED ...` to everything.
        Moved,
        /// Never answers.
        Silent,
    }

    /// A controllable RESP server on a loopback port; every command it read, connection by
    /// connection, is kept for the test to look at.
    async fn fake(mode: Fake) -> (u16, Arc<Mutex<Vec<Vec<Vec<u8>>>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        tokio::spawn(async move {
            let mut conn_no = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                conn_no += 1;
                let first = conn_no == 1;
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut cmds = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        let n = match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        while let Ok(Some((Reply::Array(Some(args)), used))) = parse(&buf) {
                            buf.drain(..used);
                            let args: Vec<Vec<u8>> = args
                                .into_iter()
                                .map(|a| match a {
                                    Reply::Bulk(Some(b)) => b,
                                    _ => Vec::new(),
                                })
                                .collect();
                            cmds.push(args.concat());
                            log.lock().expect("log").push(cmds.clone());
                            let answer: Vec<u8> = match mode {
                                Fake::GarbageOnce if first => b"?garbage\r\n".to_vec(),
                                Fake::CloseOnce if first => return,
                                Fake::Moved => b"-MOVED 3999 127.0.0.1:6381\r\n".to_vec(),
                                Fake::Silent => continue,
                                _ if args[0] == b"AUTH" => b"+OK\r\n".to_vec(),
                                _ => {
                                    let mut a = Vec::new();
                                    array(&mut a, 2);
                                    bulk(&mut a, &args[1]);
                                    a.extend_from_slice(b"$-1\r\n");
                                    a
                                }
                            };
                            for b in answer {
                                if s.write_all(&[b]).await.is_err() {
                                    return;
                                }
                            }
                            if matches!(mode, Fake::CloseAfterAnswer) && first {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (port, seen)
    }

    fn reads(port: u16, url_rest: &str) -> Reads {
        let info: redis::ConnectionInfo = format!("redis://{url_rest}127.0.0.1:{port}")
            .parse()
            .expect("a redis URL");
        Reads::new(&info).expect("plain TCP is served")
    }

    const T: Duration = Duration::from_secs(5);

    async fn key_of(r: &Reads, key: &str) -> Result<Vec<u8>, ReadError> {
        let mut fields = r.hmget(key.as_bytes(), &[b"g", b"d"], T).await?;
        assert_eq!(fields.len(), 2);
        assert_eq!(fields.pop(), Some(None));
        Ok(fields.pop().flatten().expect("the key echoed"))
    }

    #[tokio::test]
    async fn concurrent_calls_on_one_connection_each_get_their_own_answer() {
        let (port, seen) = fake(Fake::Echo).await;
        let r = reads(port, "");
        assert_eq!(key_of(&r, "first").await.expect("answered"), b"first");
        // Some calls are dropped after their command was queued: their answers must go nowhere.
        let calls = (0..60).map(|i| {
            let r = &r;
            async move {
                let key = format!("key-{i}");
                if i % 7 == 3 {
                    let cut = tokio::time::timeout(Duration::ZERO, key_of(r, &key)).await;
                    assert!(cut.is_err(), "answered without waiting");
                    return;
                }
                let got = key_of(r, &key).await.expect("answered");
                assert_eq!(got, key.as_bytes(), "call {i} got another call's answer");
            }
        });
        futures_util::future::join_all(calls).await;
        // And after them, on the same connection.
        assert_eq!(key_of(&r, "last").await.expect("answered"), b"last");
        let seen = seen.lock().expect("log");
        assert_eq!(seen.len(), 62, "one command per call, cut ones included");
        assert_eq!(seen.last().map(Vec::len), Some(62), "all on one connection");
    }

    #[tokio::test]
    async fn a_broken_connection_fails_its_calls_and_the_next_call_connects_anew() {
        for mode in [Fake::GarbageOnce, Fake::CloseOnce] {
            let (port, _) = fake(mode).await;
            let r = reads(port, "");
            assert!(matches!(
                key_of(&r, "a").await,
                Err(ReadError::Unavailable(_))
            ));
            assert_eq!(key_of(&r, "b").await.expect("reconnected"), b"b");
        }
    }

    #[tokio::test]
    async fn a_kept_connection_the_server_closed_is_replaced_within_the_call() {
        let (port, seen) = fake(Fake::CloseAfterAnswer).await;
        let r = reads(port, "");
        assert_eq!(key_of(&r, "a").await.expect("answered"), b"a");
        // The server has closed that connection meanwhile (its idle timeout).
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            key_of(&r, "b")
                .await
                .expect("asked again on a new connection"),
            b"b"
        );
        let seen = seen.lock().expect("log");
        assert_eq!(
            seen.last().map(Vec::len),
            Some(1),
            "b on a second connection"
        );
    }

    #[tokio::test]
    async fn a_cluster_nodes_redirect_turns_the_reads_off() {
        let (port, _) = fake(Fake::Moved).await;
        let r = reads(port, "");
        assert!(r.on());
        assert!(matches!(key_of(&r, "a").await, Err(ReadError::NotHere)));
        assert!(!r.on(), "the crate reads from now on");
    }

    #[tokio::test]
    async fn a_silent_server_times_out_and_its_connection_is_dropped() {
        let (port, seen) = fake(Fake::Silent).await;
        let r = reads(port, "");
        let out = r.hmget(b"a", &[b"g"], Duration::from_millis(50)).await;
        assert!(matches!(out, Err(ReadError::Unavailable(e)) if e.contains("timed out")));
        let _ = r.hmget(b"b", &[b"g"], Duration::from_millis(50)).await;
        assert_eq!(seen.lock().expect("log").len(), 2);
        assert!(
            r.pipes.get().is_none(),
            "a timed-out connection is not kept"
        );
    }

    #[tokio::test]
    async fn credentials_and_database_from_the_url_go_first() {
        let (port, seen) = fake(Fake::Echo).await;
        let r = reads(port, "user:s3cret@");
        assert_eq!(key_of(&r, "a").await.expect("answered"), b"a");
        let seen = seen.lock().expect("log");
        let cmds = seen.last().expect("a connection");
        assert_eq!(cmds[0], b"AUTHusers3cret");
        assert_eq!(cmds[1], b"HMGETagd");
        assert!(
            format!("{r:?}").find("s3cret").is_none(),
            "no password in Debug"
        );
        let info: redis::ConnectionInfo =
            format!("redis://127.0.0.1:{port}/3").parse().expect("url");
        let r = Reads::new(&info).expect("plain TCP");
        let mut want = Vec::new();
        command(&mut want, &[b"SELECT", b"3"]);
        assert_eq!(r.select.as_deref(), Some(&want[..]));
        let tls: redis::ConnectionInfo = "rediss://127.0.0.1:1".parse().expect("url");
        assert!(Reads::new(&tls).is_none(), "TLS stays with the crate");
    }

    /// RESP2 bytes of `r` (what a server sends).
    fn encode(r: &Reply, out: &mut Vec<u8>) {
        match r {
            Reply::Status(s) => {
                out.push(b'+');
                out.extend_from_slice(s);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Error(e) => {
                out.push(b'-');
                out.extend_from_slice(e.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Reply::Int(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
            Reply::Bulk(None) => out.extend_from_slice(b"$-1\r\n"),
            Reply::Bulk(Some(b)) => bulk(out, b),
            Reply::Array(None) => out.extend_from_slice(b"*-1\r\n"),
            Reply::Array(Some(items)) => {
                array(out, items.len());
                for i in items {
                    encode(i, out);
                }
            }
        }
    }

    fn reply() -> impl proptest::strategy::Strategy<Value = Reply> {
        use proptest::prelude::*;
        // A status or error line holds no CR or LF.
        let line = "[^\r\n]{0,40}";
        let leaf = prop_oneof![
            line.prop_map(|s| Reply::Status(s.into_bytes())),
            line.prop_map(Reply::Error),
            any::<i64>().prop_map(Reply::Int),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300))
                .prop_map(Reply::Bulk),
            Just(Reply::Array(None)),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            proptest::collection::vec(inner, 0..6).prop_map(|v| Reply::Array(Some(v)))
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Whatever a server (or something posing as one) sends: an answer, "not yet", or
        /// refused; never a panic, never more bytes than there are.
        #[test]
        fn any_bytes_parse_without_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            if let Ok(Some((_, n))) = parse(&bytes) {
                proptest::prop_assert!(n <= bytes.len());
            }
        }

        /// The same over RESP's own bytes, where the near misses are.
        #[test]
        fn resp_like_bytes_parse_without_panic(text in "[-+:$*0-9\r\nx]{0,200}") {
            if let Ok(Some((_, n))) = parse(text.as_bytes()) {
                proptest::prop_assert!(n <= text.len());
            }
        }

        /// Every answer comes back as sent, taking exactly its bytes; every proper prefix of it
        /// is "not yet".
        #[test]
        fn answers_round_trip(r in reply()) {
            let mut bytes = Vec::new();
            encode(&r, &mut bytes);
            proptest::prop_assert_eq!(parse(&bytes), Ok(Some((r, bytes.len()))));
            for cut in 0..bytes.len() {
                proptest::prop_assert_eq!(parse(&bytes[..cut]), Ok(None));
            }
        }
    }
}
