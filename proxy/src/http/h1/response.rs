//! An upstream's response head, parsed with httparse, and how its body is framed (RFC 9112
//! 6.3). Strict where a lenient reading lets a hostile upstream smuggle a response: a
//! `Transfer-Encoding` in an HTTP/1.0 answer, `Content-Length` values that differ, a head
//! larger than [`MAX_HEAD`] or with more than [`MAX_HEADERS`] fields are refused, and a
//! `Content-Length` beside `Transfer-Encoding` is dropped and the connection not reused.
//!
//! The head's map holds only the fields that go on to the client (`forward::keeps`): the
//! hop-by-hop ones are read for the framing and left out here, where they are in hand.

use std::mem::MaybeUninit;

use bytes::BytesMut;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Version};

use crate::http::forward::{ConnectionOptions, keeps};
use crate::http::guard::parse_length;

/// The largest response head read; an upstream sending more is refused.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in a response head (hyper's client allows as many).
pub(crate) const MAX_HEADERS: usize = 100;

/// How a response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body: an answer to HEAD, a 1xx, 204 or 304.
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    UntilClose,
}

/// A complete response head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    pub(crate) framing: Framing,
    /// Whether the connection may carry another request once this response is read.
    pub(crate) keep_alive: bool,
}

/// Why a response head was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum HeadError {
    #[error("malformed response head: {0}")]
    Malformed(httparse::Error),
    #[error("response head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("more than {MAX_HEADERS} response headers")]
    TooManyHeaders,
    #[error("invalid or conflicting Content-Length in the response")]
    ContentLength,
    #[error("Transfer-Encoding in an HTTP/1.0 response")]
    TransferEncodingInHttp10,
    #[error("unexpected 101 Switching Protocols to a request that asked for no upgrade")]
    UnaskedSwitch,
    #[error("invalid header in the response: {0}")]
    Header(&'static str),
}

/// The head at the start of `buf`, split off it; `Ok(None)` (and `buf` untouched) while it is
/// incomplete. `head_request`: the answer is to a HEAD, and has no body whatever its headers
/// say. The fields' values share the head's bytes: none is copied.
pub(crate) fn parse(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, HeadError> {
    let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        &buf[..],
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Complete(_)) => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(e) => return Err(HeadError::Malformed(e)),
    };
    let code = res.code.expect("a complete head has a status");
    let status = StatusCode::from_u16(code).map_err(|_| HeadError::Header("status code"))?;
    let version = if res.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // what is kept, by where its value lies in the head: the values are cut from it below
    let base = buf.as_ptr() as usize;
    let mut kept = Vec::with_capacity(res.headers.len());
    let (mut length, mut chunked) = (None, None);
    let mut connection = ConnectionOptions::default();
    for field in res.headers.iter().filter(|f| f.name.eq_ignore_ascii_case("connection")) {
        connection.read(field.value);
    }
    let mut length_fields = 0;
    for field in res.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| HeadError::Header("field name"))?;
        if name == header::CONTENT_LENGTH {
            length_fields += 1 + memchr::memchr_iter(b',', field.value).count();
            // a list of equal values is one length (RFC 9110 8.6); anything else is refused
            for item in field.value.split(|b| *b == b',') {
                let n = parse_length(item.trim_ascii()).ok_or(HeadError::ContentLength)?;
                if length.is_some_and(|l| l != n) {
                    return Err(HeadError::ContentLength);
                }
                length = Some(n);
            }
        } else if name == header::TRANSFER_ENCODING {
            let last = field.value.rsplit(|b| *b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
        if keeps(&name, connection) {
            let at = field.value.as_ptr() as usize - base;
            kept.push((name, at..at + field.value.len()));
        }
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(HeadError::UnaskedSwitch);
    }
    if chunked.is_some() && version == Version::HTTP_10 {
        return Err(HeadError::TransferEncodingInHttp10);
    }
    let head = buf.split_to(len).freeze();
    // room for the fields the layers add (attempts, errors): no growth on the way
    let mut headers = HeaderMap::with_capacity(kept.len() + 4);
    for (name, value) in kept {
        let value = (value.end <= head.len()).then(|| head.slice(value));
        let value = value
            .and_then(|value| HeaderValue::from_maybe_shared(value).ok())
            .ok_or(HeadError::Header("field value"))?;
        headers.append(name, value);
    }
    let mut keep_alive =
        !connection.close && (version == Version::HTTP_11 || connection.keep_alive);
    if chunked.is_some() && length.is_some() {
        // RFC 9112 6.3: Transfer-Encoding wins and the length goes, whatever the coding and
        // whether or not there is a body (Transfer-Encoding itself is hop-by-hop, left out)
        headers.remove(header::CONTENT_LENGTH);
    }
    let framing = if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), length) => {
                // RFC 9112 6.3: the connection is not trusted with another request
                keep_alive &= length.is_none();
                Framing::Chunked
            }
            (Some(false), _) | (None, None) => Framing::UntilClose,
            (None, Some(n)) => {
                if length_fields > 1 {
                    // `5, 5` or two fields: the client is told the length once
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
                }
                Framing::Length(n)
            }
        }
    };
    if framing == Framing::UntilClose {
        keep_alive = false;
    }
    Ok(Some(Head { status, version, headers, framing, keep_alive }))
}

/// [`parse`] of a copy of `input`, with the head's length (for tests and fuzzing).
pub(crate) fn parse_slice(
    input: &[u8],
    head_request: bool,
) -> Result<Option<(Head, usize)>, HeadError> {
    let mut buf = BytesMut::from(input);
    let head = parse(&mut buf, head_request)?;
    Ok(head.map(|head| (head, input.len() - buf.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<(Head, usize)>, HeadError> {
        parse_slice(text.as_bytes(), false)
    }

    fn framing(text: &str) -> (Framing, bool) {
        let (head, _) = head(text).unwrap().unwrap();
        (head.framing, head.keep_alive)
    }

    #[test]
    fn a_head_ends_at_its_empty_line_and_keeps_its_fields_in_order() {
        let text = "HTTP/1.1 201 Created\r\nx-a: 1\r\nSet-Cookie: a\r\nset-cookie: b\r\n\r\nbody";
        let (head, len) = head(text).unwrap().unwrap();
        assert_eq!(len, text.len() - 4);
        assert_eq!(head.status, 201);
        let cookies: Vec<_> = head.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a", "b"]);
        for cut in 0..len {
            assert!(parse_slice(&text.as_bytes()[..cut], false).unwrap().is_none(), "{cut}");
        }
    }

    #[test]
    fn the_head_is_split_off_and_its_values_are_not_copied() {
        let text = "HTTP/1.1 200 OK\r\nx-a: first\r\ncontent-length: 4\r\n\r\nbody";
        let mut buf = BytesMut::from(text);
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + text.len();
        let head = parse(&mut buf, false).unwrap().unwrap();
        assert_eq!(&buf[..], b"body", "the body stays");
        for (name, value) in &head.headers {
            let at = value.as_bytes().as_ptr() as usize;
            assert!(range.contains(&at), "{name} was copied");
        }
        let mut partial = BytesMut::from(&text[..20]);
        assert!(parse(&mut partial, false).unwrap().is_none());
        assert_eq!(partial.len(), 20, "an incomplete head is left where it is");
    }

    #[test]
    fn a_length_beside_any_transfer_encoding_goes_with_it() {
        for (text, framing) in [
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 10\r\n\r\n",
                Framing::UntilClose,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 10\r\n\r\n",
                Framing::Chunked,
            ),
            (
                "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\nContent-Length: 10\r\n\r\n",
                Framing::Empty,
            ),
        ] {
            let (head, _) = head(text).unwrap().unwrap();
            assert_eq!(head.framing, framing, "{text}");
            assert!(head.headers.get("content-length").is_none(), "{text}");
            assert!(!head.keep_alive || framing == Framing::Empty, "{text}");
        }
    }

    #[test]
    fn hop_by_hop_fields_are_read_for_the_framing_and_left_out_of_the_map() {
        let text = "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
                    Transfer-Encoding: chunked\r\nx-a: 1\r\n\r\n";
        let (head, _) = head(text).unwrap().unwrap();
        assert_eq!((head.framing, head.keep_alive), (Framing::Chunked, true));
        let names: Vec<_> = head.headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-a"]);
    }

    #[test]
    fn a_connection_naming_other_fields_is_kept_whole_for_the_strip_to_act_on() {
        let text = "HTTP/1.1 200 OK\r\nConnection: x-hop\r\nx-hop: 1\r\nconnection: close, x-two\r\n\
                    x-two: 2\r\nx-end: 3\r\ncontent-length: 0\r\n\r\n";
        let (mut head, _) = head(text).unwrap().unwrap();
        assert!(!head.keep_alive);
        let connection: Vec<_> = head.headers.get_all("connection").iter().collect();
        assert_eq!(connection, ["x-hop", "close, x-two"]);
        crate::http::forward::strip_hop_by_hop(&mut head.headers, false);
        let names: Vec<_> = head.headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-end", "content-length"]);
    }

    #[test]
    fn framing_follows_rfc_9112_6_3() {
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            (Framing::Length(5), true)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n"),
            (Framing::Length(5), true)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"),
            (Framing::Chunked, true)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"),
            (Framing::UntilClose, false)
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), (Framing::UntilClose, false));
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n"),
            (Framing::Empty, true)
        );
        assert_eq!(
            framing("HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n"),
            (Framing::Empty, true)
        );
        assert_eq!(framing("HTTP/1.1 100 Continue\r\n\r\n"), (Framing::Empty, true));
        let (answer_to_head, _) =
            parse_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true).unwrap().unwrap();
        assert_eq!(answer_to_head.framing, Framing::Empty);
    }

    #[test]
    fn a_length_sent_twice_or_as_a_list_is_told_once() {
        for text in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n",
        ] {
            let (head, _) = head(text).unwrap().unwrap();
            let lengths: Vec<_> = head.headers.get_all("content-length").iter().collect();
            assert_eq!(lengths, ["5"], "{text:?}");
        }
    }

    #[test]
    fn keep_alive_is_http_1_1_without_close_or_http_1_0_asking_for_it() {
        let kept = |text: &str| framing(text).1;
        assert!(!kept("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"));
        assert!(!kept("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n"));
        assert!(kept("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n"));
        assert_eq!(framing("HTTP/1.0 200 OK\r\n\r\n"), (Framing::UntilClose, false));
    }

    #[test]
    fn a_length_beside_chunked_is_dropped_and_the_connection_not_reused() {
        let text = "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n";
        let (head, _) = head(text).unwrap().unwrap();
        assert_eq!((head.framing, head.keep_alive), (Framing::Chunked, false));
        assert!(!head.headers.contains_key("content-length"));
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for (text, error) in [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
                HeadError::ContentLength,
            ),
            ("HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n", HeadError::ContentLength),
            ("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", HeadError::ContentLength),
            ("HTTP/1.1 200 OK\r\ncontent-length: 0x10\r\n\r\n", HeadError::ContentLength),
            (
                "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                HeadError::TransferEncodingInHttp10,
            ),
            ("HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n", HeadError::UnaskedSwitch),
        ] {
            assert_eq!(head(text).unwrap_err(), error, "{text:?}");
        }
        assert!(matches!(head("HTTP/1.1 200 OK\r\nx : y\r\n\r\n"), Err(HeadError::Malformed(_))));
        assert!(matches!(
            head("HTTP/1.1 200 OK\r\nx: y\r\n folded\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn too_many_or_too_large_is_refused_before_the_head_ends() {
        let many: String = (0..MAX_HEADERS + 1).map(|i| format!("x-{i}: v\r\n")).collect();
        assert_eq!(
            head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")).unwrap_err(),
            HeadError::TooManyHeaders
        );
        let endless = format!("HTTP/1.1 200 OK\r\nx: {}", "v".repeat(MAX_HEAD));
        assert_eq!(head(&endless).unwrap_err(), HeadError::TooLarge);
    }
}
