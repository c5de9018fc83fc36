//! A request head as it goes to an HTTP/1.1 upstream, written into one buffer: the request
//! line in origin form, the fields as they are (the forwarder has already removed the
//! hop-by-hop ones), `Host` when the request has none, and the body's framing.

use bytes::BufMut;
use http::header::{self, HeaderMap};
use http::request::Parts;
use http::uri::Authority;

/// How a request body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body, and no framing field.
    Empty,
    /// `Content-Length` as the client sent it, or the known size of a buffered body.
    Length(u64),
    Chunked,
}

impl Framing {
    /// The framing for a request whose fields are `headers` and whose body is `size` bytes
    /// when known, `ended` when it has nothing to send.
    pub(crate) fn of(headers: &HeaderMap, ended: bool, size: Option<u64>) -> Self {
        if let Some(n) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()) {
            // the guard let only one valid number through
            if let Ok(n) = n.trim().parse() {
                return Framing::Length(n);
            }
        }
        match (ended, size) {
            (true, _) => Framing::Empty,
            (false, Some(n)) => Framing::Length(n),
            (false, None) => Framing::Chunked,
        }
    }
}

/// Writes the head of `parts` for `authority` (the endpoint, for a request without `Host`).
pub(crate) fn write_head(
    out: &mut Vec<u8>,
    parts: &Parts,
    authority: &Authority,
    framing: Framing,
) {
    out.put_slice(parts.method.as_str().as_bytes());
    out.put_u8(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.put_slice(if target.is_empty() { b"/" } else { target.as_bytes() });
    out.put_slice(b" HTTP/1.1\r\n");
    if !parts.headers.contains_key(header::HOST) {
        field(out, b"host", authority.as_str().as_bytes());
    }
    for (name, value) in &parts.headers {
        // the framing is ours to write, once, as the body is sent: a framing field of the
        // client's (or one the forwarder added for hyper's client) never goes on beside it
        if *name == header::CONTENT_LENGTH || *name == header::TRANSFER_ENCODING {
            continue;
        }
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    match framing {
        Framing::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Length(n) => {
            out.put_slice(b"content-length: ");
            out.put_slice(itoa(n, &mut [0; 20]));
            out.put_slice(b"\r\n");
        }
        Framing::Empty => {}
    }
    out.put_slice(b"\r\n");
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// `n` in decimal, written at the end of `buf`.
pub(crate) fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(req: http::Request<()>, framing: Framing) -> String {
        let (parts, ()) = req.into_parts();
        let mut out = Vec::new();
        write_head(&mut out, &parts, &Authority::from_static("10.0.0.1:80"), framing);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_head_is_origin_form_with_the_fields_in_order_and_the_framing_last() {
        let req = http::Request::post("http://10.0.0.1:80/charge?id=7")
            .header("host", "payments")
            .header("x-a", "1")
            .body(())
            .unwrap();
        assert_eq!(
            written(req, Framing::Length(12)),
            "POST /charge?id=7 HTTP/1.1\r\nhost: payments\r\nx-a: 1\r\ncontent-length: 12\r\n\r\n"
        );
    }

    #[test]
    fn framing_fields_of_the_request_never_go_on_beside_ours() {
        let req = http::Request::get("http://10.0.0.1:80/")
            .header("host", "h")
            .header("transfer-encoding", "chunked")
            .header("content-length", "9");
        let head = written(req.body(()).unwrap(), Framing::Length(5));
        assert_eq!(head, "GET / HTTP/1.1\r\nhost: h\r\ncontent-length: 5\r\n\r\n");
    }

    #[test]
    fn a_request_without_host_names_the_endpoint_and_chunked_drops_a_length() {
        let req = http::Request::put("http://10.0.0.1:80/").header("content-length", "3");
        let head = written(req.body(()).unwrap(), Framing::Chunked);
        assert_eq!(
            head,
            "PUT / HTTP/1.1\r\nhost: 10.0.0.1:80\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn framing_prefers_the_clients_length_then_the_bodys() {
        let headers = |cl: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(cl) = cl {
                h.insert(header::CONTENT_LENGTH, cl.parse().unwrap());
            }
            h
        };
        assert_eq!(Framing::of(&headers(Some("9")), false, None), Framing::Length(9));
        assert_eq!(Framing::of(&headers(None), true, Some(0)), Framing::Empty);
        assert_eq!(Framing::of(&headers(None), false, Some(4)), Framing::Length(4));
        assert_eq!(Framing::of(&headers(None), false, None), Framing::Chunked);
        for n in [0, 7, 10, 18_446_744_073_709_551_615] {
            assert_eq!(itoa(n, &mut [0; 20]), n.to_string().as_bytes());
        }
    }
}
