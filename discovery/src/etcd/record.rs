//! The registry's layout (DESIGN.md "Registry"): one key per instance,
//! `{prefix}/{service}/{instance_id}`, holding `{"address": "HOST:PORT", "metadata": {...}}`.
//!
//! Pure functions only: building keys and key ranges, reading and writing the JSON value. A
//! value that cannot be read is the caller's to skip (with a warning), never fatal: one bad
//! entry must not take a whole service's endpoints away.

use std::fmt;
use std::net::SocketAddr;

/// `{prefix}/{service}/`: every instance of `service`. A trailing `/` on the prefix is not
/// doubled.
pub(crate) fn service_prefix(prefix: &str, service: &str) -> String {
    format!("{}/{service}/", prefix.trim_end_matches('/'))
}

/// `{prefix}/{service}/{instance_id}`.
pub(crate) fn instance_key(prefix: &str, service: &str, instance_id: &str) -> String {
    format!("{}{instance_id}", service_prefix(prefix, service))
}

/// The end of etcd's range for every key starting with `prefix`: the prefix with its last byte
/// incremented (trailing `0xff` bytes dropped first), as etcd's own clients compute it. `[0]`
/// (every key) for a prefix of only `0xff` bytes.
pub(crate) fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Where an instance says it can be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Address {
    /// An IP literal: used as it is.
    Ip(SocketAddr),
    /// A DNS name: resolved when the entry is read.
    Name { host: String, port: u16 },
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Ip(addr) => addr.fmt(f),
            Address::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Parses `HOST:PORT`: `IP:PORT`, `[IPv6]:PORT` or `NAME:PORT`, with a port from 1 to 65535.
pub(crate) fn parse_address(text: &str) -> Result<Address, String> {
    let bad = || format!("address {text:?} is not HOST:PORT");
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return if addr.port() == 0 { Err(bad()) } else { Ok(Address::Ip(addr)) };
    }
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
    let is_name = !host.is_empty()
        && host.len() <= 253
        && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && !host.starts_with(['-', '.']);
    if !is_name {
        return Err(bad());
    }
    Ok(Address::Name { host: host.to_owned(), port })
}

/// Reads an instance's value: a JSON object with a string `address`; `metadata` and any other
/// field are not looked at.
pub(crate) fn decode_value(value: &[u8]) -> Result<Address, String> {
    let json: serde_json::Value =
        serde_json::from_slice(value).map_err(|e| format!("the value is not JSON ({e})"))?;
    match json.get("address") {
        Some(serde_json::Value::String(address)) => parse_address(address),
        Some(_) => Err("\"address\" is not a string".to_owned()),
        None if json.is_object() => Err("the value has no \"address\"".to_owned()),
        None => Err("the value is not a JSON object".to_owned()),
    }
}

/// The value this instance registers.
pub(crate) fn encode_value(
    address: &str,
    metadata: &serde_json::Map<String, serde_json::Value>,
) -> Vec<u8> {
    let value = serde_json::json!({ "address": address, "metadata": metadata });
    serde_json::to_vec(&value).expect("a JSON value serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefix_service_and_instance_id() {
        assert_eq!(
            service_prefix("/outrigger/services", "payments"),
            "/outrigger/services/payments/"
        );
        assert_eq!(
            service_prefix("/outrigger/services/", "payments"),
            "/outrigger/services/payments/"
        );
        assert_eq!(instance_key("/reg", "payments", "web-1-8080"), "/reg/payments/web-1-8080");
        assert_eq!(instance_key("/", "payments", "a"), "/payments/a");
    }

    #[test]
    fn the_range_end_covers_exactly_the_prefix() {
        assert_eq!(range_end(b"/reg/payments/"), b"/reg/payments0");
        assert_eq!(range_end(b"a\xff"), b"b");
        assert_eq!(range_end(b"\xff\xff"), vec![0]);
        // a longer service name sharing the first letters is outside the range
        let (start, end) = (b"/reg/pay/".to_vec(), range_end(b"/reg/pay/"));
        assert!(b"/reg/pay/x".to_vec() >= start && b"/reg/pay/x".to_vec() < end);
        assert!(b"/reg/payments/x".to_vec() >= end);
    }

    #[test]
    fn reads_the_address_of_an_instance() {
        let value = br#"{"address": "10.0.0.7:8080", "metadata": {"zone": "a"}}"#;
        assert_eq!(decode_value(value), Ok(Address::Ip("10.0.0.7:8080".parse().unwrap())));
        let v6 = br#"{"address": "[fd00::7]:8080"}"#;
        assert_eq!(decode_value(v6), Ok(Address::Ip("[fd00::7]:8080".parse().unwrap())));
        let name = br#"{"address": "payments-0.payments.svc:9000"}"#;
        assert_eq!(
            decode_value(name),
            Ok(Address::Name { host: "payments-0.payments.svc".into(), port: 9000 })
        );
    }

    #[test]
    fn an_unreadable_value_says_what_is_wrong() {
        let cases: [(&[u8], &str); 8] = [
            (b"10.0.0.7:8080", "not JSON"),
            (b"[1, 2]", "not a JSON object"),
            (br#"{"metadata": {}}"#, "no \"address\""),
            (br#"{"address": 8080}"#, "not a string"),
            (br#"{"address": "10.0.0.7"}"#, "not HOST:PORT"),
            (br#"{"address": "10.0.0.7:0"}"#, "not HOST:PORT"),
            (br#"{"address": "10.0.0.7:99999"}"#, "not HOST:PORT"),
            (br#"{"address": "bad host:80"}"#, "not HOST:PORT"),
        ];
        for (value, expected) in cases {
            let error = decode_value(value).expect_err(&String::from_utf8_lossy(value));
            assert!(error.contains(expected), "{error:?} should say {expected:?}");
        }
    }

    #[test]
    fn the_registered_value_reads_back() {
        let mut metadata = serde_json::Map::new();
        metadata.insert("outrigger_version".into(), "0.1.0".into());
        let value = encode_value("10.0.0.7:8080", &metadata);
        let json: serde_json::Value = serde_json::from_slice(&value).unwrap();
        assert_eq!(json["metadata"]["outrigger_version"], "0.1.0");
        assert_eq!(decode_value(&value), Ok(Address::Ip("10.0.0.7:8080".parse().unwrap())));
    }
}
