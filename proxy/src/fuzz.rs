//! Entry points for the fuzz targets in `fuzz/` (`bash scripts/fuzz`). Each takes arbitrary
//! bytes and panics only when an invariant breaks: a crash here is a bug there. The test
//! command replays every input kept in `fuzz/corpus` through them (`tests/fuzz_corpus.rs`).

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, ReadBuf};

use crate::http::guard::{GuardLimits, GuardedIo};
use crate::http::idle::Activity;
use crate::messaging::envelope::{Envelope, MessageId};

/// The config loader: any text gets a config or problems, each at a position inside the text
/// as an editor shows it: on one of its lines (a final line break starts no line of its own),
/// at one of that line's characters or just past its last (where a missing closer goes).
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Err(outrigger_config::LoadError::Invalid(problems)) =
        outrigger_config::load_str("fuzz.yaml", &text)
    {
        // YAML breaks lines at LF, CRLF and a lone CR
        let mut lines: Vec<&str> = text.split("\r\n").flat_map(|l| l.split(['\n', '\r'])).collect();
        if lines.len() > 1 && lines.last() == Some(&"") {
            lines.pop();
        }
        assert!(!problems.0.is_empty(), "an error with no problem in it");
        for problem in &problems.0 {
            assert!(problem.line >= 1 && problem.col >= 1, "no position: {problem}");
            let Some(line) = lines.get(problem.line - 1) else {
                panic!("line {} of {}: {problem}", problem.line, lines.len());
            };
            let end = line.chars().count() + 1;
            assert!(problem.col <= end, "column {} of {end}: {problem}", problem.col);
            assert!(!problem.message.is_empty(), "no message: {problem}");
        }
    }
}

/// The authority of a routed request: what is accepted as a host is the authority up to an
/// optional `:port` of at most 65535.
pub fn authority(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(host) = crate::http::route::host_without_port(text) {
        assert!(!host.is_empty() && text.starts_with(host), "{text:?} gave {host:?}");
        let port = &text[host.len()..];
        if let Some(digits) = port.strip_prefix(':') {
            assert!(digits.is_empty() || digits.parse::<u16>().is_ok(), "{text:?}");
        } else {
            assert!(port.is_empty(), "{text:?} left {port:?}");
        }
    }
}

/// The envelope decoder: what decodes encodes to bytes that decode to the same encoding.
pub fn envelope(data: &[u8]) {
    if let Ok(envelope) = Envelope::from_json(data) {
        let once = envelope.to_json();
        let again = Envelope::from_json(&once).expect("an encoded envelope decodes");
        assert_eq!(again.to_json(), once, "encoding is stable");
    }
}

/// `Retry-After`: delta-seconds are taken exactly, anything else is an HTTP-date or nothing.
pub fn retry_after(data: &[u8]) {
    let Ok(value) = http::HeaderValue::from_bytes(data) else { return };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let wait = crate::policy::backoff::parse_retry_after(&value, now);
    let text = value.to_str().map(str::trim).unwrap_or_default();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        assert_eq!(wait, text.parse().ok().map(Duration::from_secs), "{text:?}");
    }
}

/// The publish API's checks. The input is `METHOD PATH\nname: value\n…\n\nbody`: what passes
/// names a valid queue, and its payload is one JSON value that an envelope carries unchanged.
pub fn publish_input(data: &[u8]) {
    let split = data.windows(2).position(|w| w == b"\n\n");
    let (head, body) = match split {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &b""[..]),
    };
    let Ok(head) = std::str::from_utf8(head) else { return };
    let mut lines = head.lines();
    let Some((method, path)) = lines.next().and_then(|l| l.split_once(' ')) else { return };
    let mut req = http::Request::builder().method(method).uri(path);
    for line in lines {
        let Some((name, value)) = line.split_once(": ") else { return };
        req = req.header(name, value);
    }
    let Ok(req) = req.body(()) else { return };
    if let Ok(asked) = crate::messaging::publish::asked(&req) {
        let name = asked.queue.as_str();
        assert_eq!(name.parse::<outrigger_config::QueueName>().ok().as_ref(), Some(&asked.queue));
        for key in [&asked.idempotency_key, &asked.ordering_key].into_iter().flatten() {
            assert!(!key.is_empty() && key.len() <= 1024, "{key:?}");
        }
    }
    if let Ok(payload) = crate::messaging::publish::json(body) {
        let text = payload.get().to_owned();
        let id = MessageId::from_u128(1);
        let envelope = Envelope::new(id, "orders", SystemTime::UNIX_EPOCH, payload).to_json();
        let carried = Envelope::from_json(&envelope).expect("an envelope decodes");
        assert_eq!(carried.payload.get(), text, "the payload arrives as it was published");
    }
}

/// The connection guard in front of hyper: the bytes it hands over do not depend on how the
/// client's bytes were cut into reads, and are the client's own bytes, up to a refusal.
///
/// The first two bytes choose the cuts: how much each client read brings, and how much room
/// each of hyper's reads offers.
///
/// And the guard and hyper agree on where every message ends: each request hyper parses from
/// what the guard handed over is a head the guard checked, in the same order (issue 17: a bare
/// LF, a lenient chunk line or an `Upgrade` header once let a request past the guard).
pub fn guard(data: &[u8]) {
    let [reads, room, input @ ..] = data else { return };
    let whole = through_guard(input, Cuts::whole());
    let cut = through_guard(input, Cuts::new(*reads, *room));
    assert_eq!(whole, cut, "the same bytes cut differently were read differently");
    let (seen, _) = &whole;
    let approved = if input.starts_with(seen) {
        &seen[..]
    } else {
        let at = find_last(seen, REFUSAL).expect("bytes not the client's are a refusal");
        assert!(input.starts_with(&seen[..at]), "the bytes before a refusal are the client's");
        assert!(seen.ends_with(b"\r\n\r\n"), "a refusal is one whole head");
        &seen[..at]
    };
    let checked = heads_checked(input);
    let parsed = heads_hyper_parses(approved);
    assert!(
        checked.starts_with(&parsed),
        "hyper read requests the guard did not check: hyper {parsed:?}, guard {checked:?}"
    );
}

/// The request lines (method and target) of the heads the guard let through, in order. Fed one
/// byte at a time, the guard hands over body bytes one by one and chunk lines whole, but a head
/// only whole, once its last byte is in: so a hand-over that is one complete head is a head.
fn heads_checked(input: &[u8]) -> Vec<(String, String)> {
    let _entered = runtime().enter();
    let mut io = GuardedIo::new(Client { input, cuts: BYTEWISE }, LIMITS, Activity::new());
    let mut cx = Context::from_waker(Waker::noop());
    let mut heads = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut out = ReadBuf::new(&mut buf);
        match Pin::new(&mut io).poll_read(&mut cx, &mut out) {
            Poll::Ready(Ok(())) if out.filled().is_empty() => return heads,
            // a refusal's synthetic head is the guard's, not one it let through
            Poll::Ready(Ok(())) if out.filled().starts_with(REFUSAL) => return heads,
            Poll::Ready(Ok(())) => heads.extend(whole_head(out.filled())),
            Poll::Ready(Err(_)) | Poll::Pending => return heads,
        }
    }
}

/// The request line of `bytes` when they are exactly one complete request head.
fn whole_head(bytes: &[u8]) -> Option<(String, String)> {
    let mut headers = [httparse::EMPTY_HEADER; LIMITS.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(n)) if n == bytes.len() => {
            // a URI keeps no fragment: hyper's request target ends at `#`
            let path = req.path?.split('#').next().unwrap_or_default();
            Some((req.method?.to_owned(), path.to_owned()))
        }
        _ => None,
    }
}

/// The request lines hyper's HTTP/1 server parses from `stream` (followed by EOF), each body
/// read to its end as hyper frames it.
fn heads_hyper_parses(stream: &[u8]) -> Vec<(String, String)> {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;

    let parsed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = parsed.clone();
    runtime().block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let service =
            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let line = (req.method().to_string(), req.uri().to_string());
                seen.lock().expect("not poisoned").push(line);
                async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
                }
            });
        let conn = hyper::server::conn::http1::Builder::new()
            .max_headers(LIMITS.max_headers.max(100))
            .serve_connection(hyper_util::rt::TokioIo::new(server), service);
        let mut answers = Vec::new();
        let client = async {
            let _ = client.write_all(stream).await;
            let _ = client.shutdown().await;
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut client, &mut answers).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(conn, client) })
            .await;
    });
    std::mem::take(&mut *parsed.lock().expect("not poisoned"))
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a runtime")
    })
}

/// How a synthetic head that refuses a request starts.
const REFUSAL: &[u8] = b"GET / HTTP/1.1\r\nhost: outrigger.invalid\r\noutrigger-rejected: ";

const LIMITS: GuardLimits = GuardLimits {
    max_header_bytes: 1024,
    max_headers: 8,
    header_read_timeout: Duration::from_secs(3600),
    idle_timeout: Duration::from_secs(3600),
    max_connections: 1,
};

/// Where reads are cut: sizes from a small xorshift, so one byte of input picks a sequence.
struct Cuts {
    reads: u64,
    room: u64,
}

impl Cuts {
    fn whole() -> Self {
        Self { reads: 0, room: 0 }
    }

    fn new(reads: u8, room: u8) -> Self {
        Self { reads: u64::from(reads) | 1 << 8, room: u64::from(room) | 1 << 8 }
    }

    /// The next size from `state` (0: everything at once), between 1 and `max`.
    fn next(state: &mut u64, max: usize) -> usize {
        if *state == 0 {
            return max;
        }
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        // small sizes most of the time: heads and chunk lines cut anywhere
        let max = if state.is_multiple_of(4) { max } else { 64 };
        1 + (*state as usize) % max
    }
}

/// `Client::cuts` for reads of one byte each.
const BYTEWISE: u64 = u64::MAX;

/// The client: `input` in reads whose sizes `cuts` choose, then EOF.
struct Client<'a> {
    input: &'a [u8],
    cuts: u64,
}

impl AsyncRead for Client<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = match self.cuts {
            BYTEWISE => 1,
            _ => Cuts::next(&mut self.cuts, 16 * 1024),
        };
        let n = n.min(buf.remaining()).min(self.input.len());
        let (now, rest) = self.input.split_at(n);
        buf.put_slice(now);
        self.input = rest;
        Poll::Ready(Ok(()))
    }
}

/// Everything hyper would read through the guard (until it would wait, or EOF), and the error
/// that ended it, if one did.
fn through_guard(input: &[u8], cuts: Cuts) -> (Vec<u8>, Option<String>) {
    let _entered = runtime().enter();
    let mut io = GuardedIo::new(Client { input, cuts: cuts.reads }, LIMITS, Activity::new());
    let mut room = cuts.room;
    let mut cx = Context::from_waker(Waker::noop());
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let size = Cuts::next(&mut room, buf.len());
        let mut out = ReadBuf::new(&mut buf[..size]);
        match Pin::new(&mut io).poll_read(&mut cx, &mut out) {
            Poll::Ready(Ok(())) if out.filled().is_empty() => return (seen, None),
            Poll::Ready(Ok(())) => seen.extend_from_slice(out.filled()),
            Poll::Ready(Err(e)) => return (seen, Some(e.to_string())),
            Poll::Pending => return (seen, None),
        }
    }
}

fn find_last(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

/// An upstream's response head, as our HTTP/1 client reads it (issue 20): whatever it accepts,
/// httparse parses as one complete head of the same length; a head cut short anywhere is
/// incomplete, never refused or read differently; and the framing it chose keeps RFC 9112
/// 6.3's rules (chunked only on HTTP/1.1, a connection read to its close is never reused).
pub fn response_head(data: &[u8]) {
    use crate::http::h1::response::{Framing, parse_slice as parse};

    let [method, input @ ..] = data else { return };
    let head_request = method & 1 == 1;
    let Ok(Some((head, len))) = parse(input, head_request) else { return };
    let mut fields = [httparse::EMPTY_HEADER; 100];
    let mut theirs = httparse::Response::new(&mut fields);
    assert_eq!(theirs.parse(input), Ok(httparse::Status::Complete(len)), "httparse disagrees");
    assert_eq!(theirs.code, Some(head.status.as_u16()));
    for cut in 0..len {
        assert!(matches!(parse(&input[..cut], head_request), Ok(None)), "cut at {cut} of {len}");
    }
    match head.framing {
        Framing::Chunked => assert_eq!(head.version, http::Version::HTTP_11),
        Framing::UntilClose => assert!(!head.keep_alive),
        Framing::Empty => assert!(
            head_request
                || head.status.is_informational()
                || matches!(head.status.as_u16(), 204 | 304)
        ),
        Framing::Length(_) => {}
    }
}

/// The chunked reader shared by the framing guard and the upstream client: a body cut into
/// reads anywhere is read the same as whole (the first byte picks the cuts), and what it reads
/// as a complete body hyper's own client reads as the same bytes.
pub fn chunked(data: &[u8]) {
    let [cuts, input @ ..] = data else { return };
    let whole = read_chunked(input, usize::MAX);
    let cut = read_chunked(input, usize::from(*cuts % 16) + 1);
    assert_eq!(whole, cut, "the same body cut differently was read differently");
    if let Chunked::Complete { data, .. } = &whole {
        // hyper refuses some trailer lines we pass over; it then reads no further either
        if let Some(Ok(theirs)) = hyper_reads_chunked(input) {
            assert_eq!(&theirs, data, "hyper read other bytes");
        }
    }
}

#[derive(Debug, PartialEq)]
enum Chunked {
    Complete { data: Vec<u8>, used: usize },
    Incomplete,
    Malformed,
}

/// Reads a chunked body from `input`, offered `step` bytes more at a time.
fn read_chunked(input: &[u8], step: usize) -> Chunked {
    use crate::http::h1::chunked::{Chunk, Step, step as next};

    let (mut at, mut used, mut data, mut offered) = (Chunk::Size, 0, Vec::new(), 0usize);
    loop {
        offered = offered.saturating_add(step).min(input.len());
        loop {
            match next(at, &input[used..offered]) {
                Step::Malformed => return Chunked::Malformed,
                Step::Need if offered == input.len() => return Chunked::Incomplete,
                Step::Need => break,
                Step::Took { n, next } => {
                    if let Chunk::Data(_) = at {
                        data.extend_from_slice(&input[used..used + n]);
                    }
                    used += n;
                    match next {
                        Some(next) => at = next,
                        None => return Chunked::Complete { data, used },
                    }
                }
            }
        }
    }
}

/// The body hyper's HTTP/1 client reads from a chunked response whose body is `input`;
/// `None` if it did not finish in time.
fn hyper_reads_chunked(input: &[u8]) -> Option<Result<Vec<u8>, ()>> {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut response = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    response.extend_from_slice(input);
    runtime().block_on(async move {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let upstream = async move {
            let mut head = [0u8; 1024];
            let _ = server.read(&mut head).await;
            let _ = server.write_all(&response).await;
            let _ = server.shutdown().await;
            // hold the connection until the client is done
            let _ = server.read(&mut head).await;
        };
        let client = async move {
            let io = hyper_util::rt::TokioIo::new(client);
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.ok()?;
            tokio::spawn(conn);
            let req = http::Request::get("/").body(http_body_util::Empty::<bytes::Bytes>::new());
            let res = send.send_request(req.ok()?).await.ok()?;
            Some(match res.into_body().collect().await {
                Ok(body) => Ok(body.to_bytes().to_vec()),
                Err(_) => Err(()),
            })
        };
        let run = async { tokio::join!(upstream, client).1 };
        tokio::time::timeout(Duration::from_secs(5), run).await.ok().flatten()
    })
}

/// The write-ahead log's reader, on a segment's bytes (the first 8 bytes of the input are the
/// number the segment starts at): arbitrary bytes and truncations never panic, and each record
/// it yields is whole and checks out: numbered one after another from the start, and encoding
/// it again gives exactly the bytes it was read from (so its checksum held).
pub fn wal_frames(data: &[u8]) {
    use crate::messaging::broker::embedded::wal::frame;
    let (first, bytes) = match data.split_first_chunk::<8>() {
        Some((first, rest)) => (u64::from_le_bytes(*first), rest),
        None => (1, data),
    };
    let mut frames = frame::frames(bytes, first);
    let (mut at, mut expected) = (0, first);
    let mut again = Vec::new();
    for record in frames.by_ref() {
        assert_eq!(record.lsn, expected, "records are numbered one after another");
        again.clear();
        frame::encode(&mut again, record.lsn, record.payload);
        assert_eq!(&bytes[at..at + again.len()], &again[..], "record {} re-encodes", record.lsn);
        at += again.len();
        expected = expected.checked_add(1).expect("a record numbered u64::MAX is never read");
    }
    assert_eq!(frames.end(), at);
}
