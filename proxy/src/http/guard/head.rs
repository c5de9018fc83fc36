//! What the guard reads of a request head and a chunk line, by RFC 9112's rules and no more
//! leniently than hyper reads them: the body's framing (sections 6.1 and 6.3), `Content-Length`
//! (one number per field; hyper refuses a list), and the synthetic head a refusal travels in. Pure functions over bytes, so the fuzz target and the
//! unit tests drive them directly.

use std::mem::MaybeUninit;

use crate::error::ProxyError;

use super::REJECTED_HEADER;

/// Headers parsed on the stack; a larger `max_headers` takes a heap buffer.
const STACK_HEADERS: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// A request head that passed: how its body is framed, and whether hyper may turn the connection
/// into a tunnel after it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Head {
    pub(crate) framing: Framing,
    pub(crate) upgrade: bool,
}

/// Checks one complete request head against RFC 9112's framing rules and our limits.
pub(super) fn check_head(head: &[u8], max_headers: usize) -> Result<Head, (u16, String)> {
    with_checked_head(head, max_headers, |_, head| head)
}

/// Checks one complete request head as [`check_head`] does, and hands `then` the parsed
/// request with what the check found: one parser for the guard and the server (`h1/server.rs`).
pub(crate) fn with_checked_head<R>(
    head: &[u8],
    max_headers: usize,
    then: impl FnOnce(&httparse::Request<'_, '_>, Head) -> R,
) -> Result<R, (u16, String)> {
    if max_headers <= STACK_HEADERS {
        let mut headers = [const { MaybeUninit::uninit() }; STACK_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let checked = check_head_with(head, &mut req, &mut headers[..max_headers])?;
        Ok(then(&req, checked))
    } else {
        let mut headers = vec![MaybeUninit::uninit(); max_headers];
        let mut req = httparse::Request::new(&mut []);
        let checked = check_head_with(head, &mut req, &mut headers)?;
        Ok(then(&req, checked))
    }
}

fn check_head_with<'h, 'b>(
    head: &'b [u8],
    req: &mut httparse::Request<'h, 'b>,
    headers: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Head, (u16, String)> {
    let max = headers.len();
    match req.parse_with_uninit_headers(head, headers) {
        // the parser ends the head where the guard did, or they disagree: refuse
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Ok(httparse::Status::Complete(_)) => {
            return Err((400, "the request head ends ambiguously".into()));
        }
        Ok(httparse::Status::Partial) => return Err((400, "incomplete request head".into())),
        Err(httparse::Error::TooManyHeaders) => {
            return Err((431, format!("more than {max} request headers")));
        }
        Err(e) => return Err((400, format!("malformed request head: {e}"))),
    }
    let mut length: Option<u64> = None;
    let mut chunked = None;
    // hyper's rule for a request that may switch protocols: CONNECT, or `Upgrade` on HTTP/1.1
    // (with or without `Connection: upgrade`); its answer decides
    let mut upgrade = req.method == Some("CONNECT");
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            // one number per field: hyper refuses a list, even of equal values
            let n = parse_length(h.value.trim_ascii()).ok_or_else(|| {
                (400, "invalid Content-Length (expected one decimal number)".to_string())
            })?;
            if length.is_some_and(|l| l != n) {
                return Err((400, "conflicting Content-Length values".into()));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= req.version == Some(1);
        } else if name.eq_ignore_ascii_case(REJECTED_HEADER) {
            return Err((400, format!("the {REJECTED_HEADER} header is reserved")));
        }
    }
    let framing = match (chunked, length) {
        (Some(_), Some(_)) => {
            return Err((400, "both Content-Length and Transfer-Encoding".into()));
        }
        (Some(_), None) if req.version == Some(0) => {
            return Err((400, "Transfer-Encoding in an HTTP/1.0 request".into()));
        }
        (Some(false), None) => return Err((400, "Transfer-Encoding must end in chunked".into())),
        (Some(true), None) => Framing::Chunked,
        (None, Some(n)) if n > 0 => Framing::Length(n),
        (None, _) => Framing::None,
    };
    Ok(Head { framing, upgrade })
}

/// One decimal `Content-Length` value, as hyper reads it; `None` when it is not one.
pub(crate) fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// The client's request as the guard refused it, when `req` is the synthetic head of a refusal:
/// the status and reason travel in [`REJECTED_HEADER`] (`"<status> <reason>"`).
pub(crate) fn refusal<B>(req: &http::Request<B>) -> Option<ProxyError> {
    let value = req.headers().get(REJECTED_HEADER)?;
    let text = value.to_str().unwrap_or("400 malformed request");
    let (status, reason) = text.split_once(' ').unwrap_or(("400", text));
    let reason = reason.into();
    Some(if status == "431" {
        ProxyError::HeadersTooLarge { reason }
    } else {
        ProxyError::BadRequest { reason }
    })
}
