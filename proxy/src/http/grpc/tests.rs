use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use http::{HeaderMap, Response};
use http_body::Frame;

use super::watch::Watch;
use super::*;
use crate::error::ProxyError;
use crate::http::respond::error_response;

fn content_type(value: &'static str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(value));
    headers
}

#[test]
fn a_grpc_call_is_told_by_its_content_type() {
    for grpc in ["application/grpc", "application/grpc+proto", "Application/GRPC+json"] {
        assert!(is_grpc(&content_type(grpc)), "{grpc}");
    }
    for other in ["application/grpc-web", "application/grpcx", "application/json", "text/plain"] {
        assert!(!is_grpc(&content_type(other)), "{other}");
    }
    assert!(!is_grpc(&HeaderMap::new()));
}

#[test]
fn statuses_parse_by_number_and_anything_else_is_unknown() {
    let parse = |v: &'static str| parse_status(&HeaderValue::from_static(v));
    assert_eq!(parse("0"), GrpcStatus::Ok);
    assert_eq!(parse("14"), GrpcStatus::Unavailable);
    assert_eq!(parse("16"), GrpcStatus::Unauthenticated);
    for odd in ["17", "-1", "unavailable", "", "1 4"] {
        assert_eq!(parse(odd), GrpcStatus::Unknown, "{odd:?}");
    }
    assert_eq!(trailers_status(&HeaderMap::new()), GrpcStatus::Unknown);
}

#[test]
fn only_the_servers_trouble_is_a_failure() {
    let failures: Vec<&str> =
        GrpcStatus::ALL.into_iter().filter(|s| is_failure(*s)).map(GrpcStatus::name).collect();
    assert_eq!(failures, ["unknown", "deadline-exceeded", "internal", "unavailable", "data-loss"]);
}

#[test]
fn grpc_message_is_percent_encoded_per_the_spec() {
    assert_eq!(percent_encode(b"circuit open for upstream p"), "circuit open for upstream p");
    assert_eq!(percent_encode(b"100% \"done\"\n"), "100%25 \"done\"%0A");
    assert_eq!(percent_encode("caf\u{e9} ~".as_bytes()), "caf%C3%A9 ~");
}

#[test]
fn our_answer_to_a_grpc_call_is_trailers_only() {
    let err = ProxyError::CircuitOpen { upstream: "p".into(), retry_after: Duration::from_secs(2) };
    let mut res = error_response(&err);
    answer_as_grpc(&mut res);
    assert_eq!(res.status(), 200);
    let h = res.headers();
    assert_eq!(h["content-type"], "application/grpc");
    assert_eq!(h["grpc-status"], "14");
    assert_eq!(h["grpc-message"], "circuit open for upstream p");
    assert_eq!(h["outrigger-error"], "circuit-open");
    assert_eq!(h["retry-after"], "2");
    assert!(!h.contains_key("content-length"));
    assert!(http_body::Body::is_end_stream(res.body()), "no body: the head ends the stream");
}

#[test]
fn an_upstreams_answer_is_never_rewritten() {
    let mut res = Response::new(Body::full("upstream's own"));
    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    res.headers_mut().insert("outrigger-error", HeaderValue::from_static("circuit-open"));
    answer_as_grpc(&mut res);
    assert_eq!(res.status(), 503);
    assert!(!res.headers().contains_key("grpc-status"));
}

#[test]
fn the_head_says_trailers_only_or_trailers_to_come() {
    let mut only = Response::new(());
    only.headers_mut().insert(STATUS_HEADER, HeaderValue::from_static("14"));
    assert_eq!(read_head(&mut only), Head::Status(GrpcStatus::Unavailable));
    assert_eq!(only.extensions().get::<Answered>(), Some(&Answered(GrpcStatus::Unavailable)));
    assert_eq!(read_head(&mut Response::new(())), Head::Trailers);
    let mut http = Response::new(());
    *http.status_mut() = StatusCode::BAD_GATEWAY;
    http.headers_mut().insert(STATUS_HEADER, HeaderValue::from_static("0"));
    assert_eq!(read_head(&mut http), Head::Http, "not 200: an HTTP answer, whatever it carries");
}

type Polled = Poll<Option<Result<Frame<Bytes>, ()>>>;

fn watched() -> (Watch, Arc<Mutex<Vec<GrpcStatus>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut watch = Watch::default();
    for _ in 0..2 {
        let seen = seen.clone();
        watch.on_status(move |status| seen.lock().unwrap().push(status));
    }
    (watch, seen)
}

#[test]
fn the_watch_tells_each_observer_once_when_the_trailers_pass() {
    let (mut watch, seen) = watched();
    watch.observe::<()>(&Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))))));
    assert!(seen.lock().unwrap().is_empty(), "a message says nothing yet");
    let mut trailers = HeaderMap::new();
    trailers.insert(STATUS_HEADER, HeaderValue::from_static("5"));
    watch.observe::<()>(&Poll::Ready(Some(Ok(Frame::trailers(trailers)))));
    watch.observe::<()>(&Poll::Ready(None));
    assert_eq!(*seen.lock().unwrap(), [GrpcStatus::NotFound, GrpcStatus::NotFound]);
}

#[test]
fn a_stream_that_ends_or_breaks_without_trailers_is_a_failure() {
    let (mut watch, seen) = watched();
    watch.observe::<()>(&Poll::Ready(None));
    assert_eq!(*seen.lock().unwrap(), [GrpcStatus::Unknown, GrpcStatus::Unknown]);
    let (mut watch, seen) = watched();
    let broken: Polled = Poll::Ready(Some(Err(())));
    watch.observe(&broken);
    assert!(seen.lock().unwrap().iter().all(|s| is_failure(*s)));
}
