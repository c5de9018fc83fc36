//! The chunked transfer coding (RFC 9112 7.1), read one step at a time, as hyper's decoder reads
//! it: each line ends in CRLF with no other CR or LF in it, chunk data is followed by exactly
//! CRLF, trailers end at an empty line. One reader for both directions: the framing guard follows
//! a client's chunked request body with it to find the next head, and the upstream client decodes
//! a chunked response with it, so the two can never disagree on where a body ends.

/// The longest chunk-size or trailer line read; longer is malformed.
pub(crate) const MAX_LINE: usize = 4 * 1024;
/// The most trailer bytes read after a chunked body, in either direction.
pub(crate) const MAX_TRAILERS: usize = 16 * 1024;

/// Where a reader stands in a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// This many bytes of chunk data still to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines, then an empty line.
    Trailers,
}

/// What the next bytes of a chunked body are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Not enough bytes to take a step.
    Need,
    /// The first `n` bytes were read: chunk data when the reader stood at `Chunk::Data`, a
    /// trailer line (CRLF included) when at `Chunk::Trailers` with `next` `Some`, else framing.
    /// `next`: where the reader stands after them; `None`: the body ended.
    Took { n: usize, next: Option<Chunk> },
    /// The framing is broken here: nothing after this point may be read as HTTP.
    Malformed,
}

/// One step of reading a chunked body from `at`, over the bytes `seen` that follow.
pub(crate) fn step(at: Chunk, seen: &[u8]) -> Step {
    match at {
        Chunk::Data(left) => {
            if seen.is_empty() {
                return Step::Need;
            }
            let n = (seen.len() as u64).min(left);
            let next = if n == left { Chunk::DataEnd } else { Chunk::Data(left - n) };
            Step::Took { n: n as usize, next: Some(next) }
        }
        Chunk::DataEnd => match seen {
            [b'\r', b'\n', ..] => Step::Took { n: 2, next: Some(Chunk::Size) },
            [] | [b'\r'] => Step::Need,
            _ => Step::Malformed,
        },
        Chunk::Size | Chunk::Trailers => {
            let Some(at_lf) = memchr::memchr(b'\n', seen) else {
                return if seen.len() > MAX_LINE { Step::Malformed } else { Step::Need };
            };
            let n = at_lf + 1;
            let Some(line) = seen[..n].strip_suffix(b"\r\n").filter(|l| !l.contains(&b'\r')) else {
                return Step::Malformed;
            };
            if line.len() > MAX_LINE {
                return Step::Malformed;
            }
            let next = match (at, line) {
                (Chunk::Size, line) => match chunk_size(line) {
                    Some(0) => Chunk::Trailers,
                    Some(size) => Chunk::Data(size),
                    None => return Step::Malformed,
                },
                (_, []) => return Step::Took { n, next: None },
                (_, _) => Chunk::Trailers,
            };
            Step::Took { n, next: Some(next) }
        }
    }
}

/// The chunk-size line (`1a\r\n`) for `n` bytes of data, written at the end of `buf`.
pub(crate) fn size_line(mut n: usize, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len() - 2;
    buf[at..].copy_from_slice(b"\r\n");
    loop {
        at -= 1;
        buf[at] = b"0123456789abcdef"[n % 16];
        n /= 16;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// A trailer line (without its CRLF) as a field; `None` when it is not a valid one.
pub(crate) fn trailer_field(line: &[u8]) -> Option<(http::HeaderName, http::HeaderValue)> {
    let colon = memchr::memchr(b':', line)?;
    let name = http::HeaderName::from_bytes(&line[..colon]).ok()?;
    let value = http::HeaderValue::from_bytes(line[colon + 1..].trim_ascii()).ok()?;
    Some((name, value))
}

/// The size of a chunk-size line without its CRLF (`1a`, `1a ;ext=v`); `None` when malformed.
/// As hyper reads it: hex digits (at most 15 here, so a size always fits), optional spaces or
/// tabs, then nothing or an extension after `;`.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return None;
    }
    let rest = &line[digits..];
    let rest = &rest[rest.iter().take_while(|b| matches!(b, b' ' | b'\t')).count()..];
    if !(rest.is_empty() || rest.starts_with(b";")) {
        return None;
    }
    let hex = std::str::from_utf8(&line[..digits]).ok()?;
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `body` from the start to its end; what was data, and how many bytes it spanned.
    fn read(body: &[u8]) -> Result<(Vec<u8>, usize), &'static str> {
        let (mut at, mut used, mut data) = (Chunk::Size, 0, Vec::new());
        loop {
            match step(at, &body[used..]) {
                Step::Need => return Err("incomplete"),
                Step::Malformed => return Err("malformed"),
                Step::Took { n, next } => {
                    if let Chunk::Data(_) = at {
                        data.extend_from_slice(&body[used..used + n]);
                    }
                    used += n;
                    match next {
                        Some(next) => at = next,
                        None => return Ok((data, used)),
                    }
                }
            }
        }
    }

    #[test]
    fn chunks_extensions_and_trailers_read_to_the_end_and_no_further() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-sum: 9\r\n\r\nGET / HTTP/1.1\r\n";
        let (data, used) = read(body).unwrap();
        assert_eq!(data, b"hello world");
        assert_eq!(&body[used..], b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn broken_framing_is_malformed() {
        for body in [
            &b"5\r\nhelloXX0\r\n\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"z\r\n",
            b"5\r\nhello\r\n0\r\nx: 1\n\r\n",
            b"1234567890abcdef0\r\n",
            b"5\r\r\nhello\r\n",
        ] {
            assert_eq!(read(body), Err("malformed"), "{:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn a_cut_body_needs_more_at_every_byte() {
        let body = b"5\r\nhello\r\n0\r\nx: 1\r\n\r\n";
        for cut in 0..body.len() {
            assert_eq!(read(&body[..cut]), Err("incomplete"), "cut at {cut}");
        }
    }

    #[test]
    fn an_endless_line_is_malformed_once_it_passes_the_limit() {
        let line = vec![b'1'; MAX_LINE + 1];
        assert_eq!(step(Chunk::Size, &line[..MAX_LINE]), Step::Need);
        assert_eq!(step(Chunk::Trailers, &line), Step::Malformed);
    }

    #[test]
    fn chunk_size_lines() {
        assert_eq!(chunk_size(b"1a"), Some(26));
        assert_eq!(chunk_size(b"1A \t;x"), Some(26));
        assert_eq!(chunk_size(b"0;name=value"), Some(0));
        assert_eq!(chunk_size(b"fffffffffffffff"), Some(0xfff_ffff_ffff_ffff));
        for bad in
            [&b"zz"[..], b"1a-", b"", b";x", b"1 a", b"ffffffffffffffff", b"ffffffffffffffffff"]
        {
            assert_eq!(chunk_size(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
