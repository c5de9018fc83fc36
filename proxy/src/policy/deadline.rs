//! The call's deadline in headers (DESIGN.md, "Deadlines"): what the client asks for, and the
//! time left that each attempt is sent on with.
//!
//! In: `outrigger-timeout: DURATION` (the config's syntax, `1500ms`) on any call and, on a gRPC
//! call, `grpc-timeout` (gRPC's wire format: 1 to 8 ASCII digits and one of `H M S m u n`). A
//! malformed value is refused (400 `bad-request`), not ignored: a caller that meant to bound its
//! call must not get an unbounded one. Huge values saturate at the config's 365d cap.
//!
//! Out: `outrigger-timeout: <ms>ms` on every attempt, and `grpc-timeout` on a gRPC call's,
//! replacing the client's. This is also the contract between our layers: inside the stack, the
//! request's `outrigger-timeout` is the time left when the request was handed on, written by the
//! whole-request deadline (`timeout.rs`) and rewritten by `retry.rs` for each later attempt. A
//! fact carried in the header the request is sent with anyway, so no extension (and no
//! allocation) is needed to carry it.

use std::time::Duration;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use outrigger_config as config;

use crate::error::ProxyError;
use crate::http::grpc::is_grpc;

pub const OUTRIGGER_TIMEOUT: HeaderName = HeaderName::from_static("outrigger-timeout");
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// gRPC's limit: "TimeoutValue → {positive integer as ASCII string of at most 8 digits}".
const GRPC_MAX_VALUE: u64 = 99_999_999;

/// The shortest timeout the client's headers ask for (`None`: they ask for none), or 400
/// `bad-request` when one is malformed. Several values of one header: the shortest counts.
pub fn requested(headers: &HeaderMap) -> Result<Option<Duration>, ProxyError> {
    let mut shortest: Option<Duration> = None;
    let mut keep = |d: Duration| shortest = Some(shortest.map_or(d, |s| s.min(d)));
    for value in headers.get_all(OUTRIGGER_TIMEOUT) {
        let parsed = value.to_str().ok().and_then(config::Duration::parse_saturating);
        let Some(d) = parsed else {
            return Err(malformed("outrigger-timeout", value, "a duration, e.g. 1500ms"));
        };
        keep(d.get());
    }
    if headers.contains_key(GRPC_TIMEOUT) && is_grpc(headers) {
        for value in headers.get_all(GRPC_TIMEOUT) {
            let Some(d) = parse_grpc_timeout(value.as_bytes()) else {
                return Err(malformed(
                    "grpc-timeout",
                    value,
                    "1 to 8 digits and one of H M S m u n",
                ));
            };
            keep(d);
        }
    }
    Ok(shortest)
}

fn malformed(name: &str, value: &HeaderValue, expected: &str) -> ProxyError {
    let shown = String::from_utf8_lossy(value.as_bytes());
    let reason = format!("{name}: {shown:?} is malformed (expected {expected})");
    ProxyError::BadRequest { reason: reason.into() }
}

/// The time left that the layer outside wrote into the request (see the module doc), if any.
pub fn time_left(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(OUTRIGGER_TIMEOUT)?.to_str().ok()?;
    config::Duration::parse_saturating(value).map(config::Duration::get)
}

/// `grpc-timeout`'s value, by the gRPC spec ("HTTP/2 protocol", Requests): 1 to 8 digits, then
/// `H` hours, `M` minutes, `S` seconds, `m` millis, `u` micros or `n` nanos. Never past 365d.
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    let d = match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    };
    Some(d.min(config::Duration::MAX.get())) // 99999999H is 11 thousand years
}

/// `left` as a `grpc-timeout` value: the finest unit whose count fits in 8 digits, rounded
/// down (a deadline handed on is never later than ours), then written in the coarsest unit
/// that says the same exactly (`287m`, not `287000u`).
pub fn encode_grpc_timeout(left: Duration) -> (u64, u8) {
    const UNITS: [(u128, u8); 6] = [
        (1, b'n'),
        (1_000, b'u'),
        (1_000_000, b'm'),
        (1_000_000_000, b'S'),
        (60_000_000_000, b'M'),
        (3_600_000_000_000, b'H'),
    ];
    let nanos = left.as_nanos();
    let finest = UNITS
        .iter()
        .position(|&(size, _)| nanos / size <= u128::from(GRPC_MAX_VALUE))
        .unwrap_or(UNITS.len() - 1);
    let (size, _) = UNITS[finest];
    let floored = nanos / size * size;
    let (size, unit) = UNITS[finest..]
        .iter()
        .rev()
        .find(|&&(size, _)| floored.is_multiple_of(size))
        .copied()
        .unwrap_or(UNITS[finest]);
    let count = u64::try_from(floored / size).unwrap_or(GRPC_MAX_VALUE).min(GRPC_MAX_VALUE);
    (count, unit)
}

/// The headers a request is sent on with when `left` remains: `outrigger-timeout` in whole
/// milliseconds (rounded down) and, for a gRPC call, `grpc-timeout`.
#[derive(Debug, Clone)]
pub struct Stamp {
    outrigger: HeaderValue,
    grpc: HeaderValue,
}

impl Stamp {
    /// Two small header values: one allocation each. The whole-request layer makes the stamp
    /// of `timeouts.request` once, at config time, for the calls that ask for nothing shorter.
    pub fn new(left: Duration) -> Self {
        Self { outrigger: outrigger_timeout(left), grpc: grpc_timeout(left) }
    }

    /// Writes this stamp into `headers`, replacing the client's values.
    pub fn write(&self, headers: &mut HeaderMap) {
        headers.insert(OUTRIGGER_TIMEOUT, self.outrigger.clone());
        if is_grpc(headers) {
            headers.insert(GRPC_TIMEOUT, self.grpc.clone());
        }
    }
}

/// Writes the headers for `left` into `headers`, replacing the client's values. Allocates the
/// values (a `HeaderValue` owns its bytes; hyper writes them after we return): one for
/// `outrigger-timeout`, one more on a gRPC call.
pub fn write(headers: &mut HeaderMap, left: Duration) {
    headers.insert(OUTRIGGER_TIMEOUT, outrigger_timeout(left));
    if is_grpc(headers) {
        headers.insert(GRPC_TIMEOUT, grpc_timeout(left));
    }
}

fn outrigger_timeout(left: Duration) -> HeaderValue {
    let mut buf = [0u8; 24];
    let millis = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
    let len = digits(millis, &mut buf);
    buf[len..len + 2].copy_from_slice(b"ms");
    HeaderValue::from_bytes(&buf[..len + 2]).expect("digits and ms")
}

fn grpc_timeout(left: Duration) -> HeaderValue {
    let (count, unit) = encode_grpc_timeout(left);
    let mut buf = [0u8; 24];
    let len = digits(count, &mut buf);
    buf[len] = unit;
    HeaderValue::from_bytes(&buf[..=len]).expect("digits and a unit")
}

/// Writes `n` in decimal at the start of `buf`; returns how many digits.
fn digits(mut n: u64, buf: &mut [u8; 24]) -> usize {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = tmp.len() - i;
    buf[..len].copy_from_slice(&tmp[i..]);
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    const GRPC: (&str, &str) = ("content-type", "application/grpc");

    #[test]
    fn grpc_timeout_parses_every_unit() {
        let parse = |v: &str| parse_grpc_timeout(v.as_bytes());
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("4S"), Some(Duration::from_secs(4)));
        assert_eq!(parse("287m"), Some(Duration::from_millis(287)));
        assert_eq!(parse("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse("6n"), Some(Duration::from_nanos(6)));
        assert_eq!(parse("0m"), Some(Duration::ZERO));
        assert_eq!(parse("00000001S"), Some(Duration::from_secs(1)), "8 digits, leading zeros");
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
    }

    #[test]
    fn a_huge_grpc_timeout_saturates_at_the_config_cap() {
        assert_eq!(parse_grpc_timeout(b"99999999H"), Some(config::Duration::MAX.get()));
    }

    #[test]
    fn malformed_grpc_timeouts_are_refused() {
        for bad in [
            "",
            "m",
            "1",
            "123456789m",
            "1h",
            "1s",
            "1ms",
            "1 m",
            " 1m",
            "1m ",
            "-1m",
            "+1m",
            "1.5S",
            "1x",
            "1mm",
            "0x1m",
            "１m",
        ] {
            assert_eq!(parse_grpc_timeout(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn grpc_timeout_is_written_in_the_finest_unit_that_fits_in_8_digits_rounded_down() {
        let enc = |d: Duration| {
            let (n, unit) = encode_grpc_timeout(d);
            format!("{n}{}", unit as char)
        };
        assert_eq!(enc(Duration::from_nanos(99_999_999)), "99999999n");
        assert_eq!(enc(Duration::from_nanos(100_001_001)), "100001u", "floored to micros");
        assert_eq!(enc(Duration::from_nanos(100_000_001)), "100m", "floored, then exact in millis");
        assert_eq!(enc(Duration::from_nanos(287_123_456)), "287123u");
        assert_eq!(enc(Duration::from_millis(287)), "287m", "exact: the coarsest unit");
        assert_eq!(enc(Duration::from_nanos(123_456_789_012)), "123456m", "floored to millis");
        assert_eq!(enc(Duration::from_secs(10)), "10S");
        assert_eq!(enc(Duration::from_secs(120)), "2M");
        assert_eq!(enc(Duration::from_secs(7200)), "2H");
        assert_eq!(enc(Duration::from_millis(100_000_000_123)), "1666666M", "floored to minutes");
        assert_eq!(enc(config::Duration::MAX.get()), "8760H");
        assert_eq!(enc(Duration::MAX), "99999999H");
        assert_eq!(enc(Duration::ZERO), "0H");
        for d in
            [Duration::from_nanos(1), Duration::from_millis(1_500), Duration::from_secs(99_999)]
        {
            let (n, unit) = encode_grpc_timeout(d);
            let back = parse_grpc_timeout(format!("{n}{}", unit as char).as_bytes()).unwrap();
            assert!(back <= d && n <= GRPC_MAX_VALUE, "{d:?} -> {back:?}");
        }
    }

    #[test]
    fn outrigger_timeout_is_whole_milliseconds_rounded_down() {
        assert_eq!(outrigger_timeout(Duration::from_micros(287_999)), "287ms");
        assert_eq!(outrigger_timeout(Duration::ZERO), "0ms");
        assert_eq!(outrigger_timeout(config::Duration::MAX.get()), "31536000000ms");
        assert_eq!(grpc_timeout(Duration::from_millis(287)), "287m");
    }

    #[test]
    fn the_shortest_requested_timeout_counts_and_grpc_timeout_only_on_a_grpc_call() {
        let req = headers(&[("outrigger-timeout", "1500ms"), ("grpc-timeout", "200m")]);
        assert_eq!(requested(&req).unwrap(), Some(Duration::from_millis(1500)), "not gRPC");
        let grpc = headers(&[GRPC, ("outrigger-timeout", "1500ms"), ("grpc-timeout", "200m")]);
        assert_eq!(requested(&grpc).unwrap(), Some(Duration::from_millis(200)));
        let two = headers(&[("outrigger-timeout", "1s"), ("outrigger-timeout", "300ms")]);
        assert_eq!(requested(&two).unwrap(), Some(Duration::from_millis(300)));
        assert_eq!(requested(&headers(&[])).unwrap(), None);
        let huge = headers(&[("outrigger-timeout", "100000d")]);
        assert_eq!(requested(&huge).unwrap(), Some(config::Duration::MAX.get()));
    }

    #[test]
    fn a_malformed_timeout_header_is_a_bad_request() {
        for (name, value) in [
            ("outrigger-timeout", "300"),
            ("outrigger-timeout", "soon"),
            ("grpc-timeout", "300ms"),
            ("grpc-timeout", "123456789S"),
        ] {
            let err = requested(&headers(&[GRPC, (name, value)])).unwrap_err();
            assert_eq!(
                (err.status().as_u16(), err.kind()),
                (400, "bad-request"),
                "{name}: {value}"
            );
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn the_stamp_replaces_the_clients_values_and_adds_grpc_timeout_on_grpc_calls() {
        let mut plain = headers(&[("outrigger-timeout", "9s"), ("outrigger-timeout", "8s")]);
        Stamp::new(Duration::from_millis(1500)).write(&mut plain);
        assert_eq!(plain.get_all("outrigger-timeout").iter().count(), 1);
        assert_eq!(
            (plain["outrigger-timeout"].as_bytes(), plain.get("grpc-timeout")),
            (&b"1500ms"[..], None)
        );
        let mut grpc = headers(&[GRPC, ("grpc-timeout", "9S")]);
        write(&mut grpc, Duration::from_millis(1500));
        assert_eq!(
            (grpc["outrigger-timeout"].as_bytes(), grpc["grpc-timeout"].as_bytes()),
            (&b"1500ms"[..], &b"1500m"[..])
        );
        assert_eq!(time_left(&grpc), Some(Duration::from_millis(1500)));
    }
}
