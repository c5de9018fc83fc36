//! The envelope: what is stored for every message and, later, POSTed to the app (DESIGN.md,
//! "Messaging"): `{"id","queue","dispatch_date","payload","error":[…],"metadata":{…}}`.
//!
//! The payload is kept as the raw JSON text the app published, byte for byte, so a consumer gets
//! exactly what the producer sent (numbers keep their spelling, keys their order). Ids are
//! ULID-shaped: 48 bits of Unix milliseconds then 80 random bits, 26 Crockford base32
//! characters, so ids sort by publish time as text and as numbers.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// A message as stored and delivered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub id: MessageId,
    pub queue: String,
    /// When the message was accepted, RFC 3339 UTC with milliseconds.
    pub dispatch_date: String,
    /// The JSON exactly as published.
    pub payload: Box<RawValue>,
    /// One record per failed delivery, oldest first.
    pub error: Vec<ErrorRecord>,
    /// `idempotency_key`, `ordering_key`, `traceparent` when given; dead-lettering adds its own.
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// One failed delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRecord {
    /// The app's status, or `None` (JSON `null`) for a timeout or a connection failure.
    pub status_code: Option<u16>,
    pub message: String,
    pub stack_trace: String,
    /// RFC 3339 UTC.
    pub date: String,
}

/// Metadata keys a dead letter carries (DESIGN.md "Messaging").
pub mod dead_letter_keys {
    pub const ORIGINAL_QUEUE: &str = "original_queue";
    pub const SUBSCRIBER: &str = "subscriber";
    pub const REASON: &str = "reason";
    pub const ATTEMPTS: &str = "attempts";
    pub const DEAD_LETTERED_AT: &str = "dead_lettered_at";
}

// === impl Envelope ===

impl Envelope {
    /// A new message for `queue`, accepted at `now`.
    pub fn new(id: MessageId, queue: &str, now: SystemTime, payload: Box<RawValue>) -> Self {
        Envelope {
            id,
            queue: queue.to_owned(),
            dispatch_date: rfc3339(now),
            payload,
            error: Vec::new(),
            metadata: serde_json::Map::new(),
        }
    }

    /// The `outrigger-ordering-key` it was published with.
    pub fn ordering_key(&self) -> Option<&str> {
        self.metadata.get("ordering_key")?.as_str()
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope serializes")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

// === impl MessageId ===

/// 48 bits of Unix milliseconds, then 80 random bits; monotonic within a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(u128);

/// Crockford's base32: no I, L, O, U, so an id read aloud or retyped is not misread.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const ID_LEN: usize = 26;

impl MessageId {
    /// A fresh id for `now`. Within one millisecond, ids count up from the first one's random
    /// part, so two ids made in order compare in order (ULID's monotonic rule).
    pub fn generate(now: SystemTime) -> Self {
        static LAST: Mutex<u128> = Mutex::new(0);
        let millis = unix_millis(now) as u128 & ((1 << 48) - 1);
        let random = rand::random::<u128>() & ((1 << 80) - 1);
        let fresh = (millis << 80) | random;
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        // the clock may step back or stand still: never go below the previous id
        let id = if fresh > *last { fresh } else { *last + 1 };
        *last = id;
        MessageId(id)
    }

    pub fn from_u128(value: u128) -> Self {
        MessageId(value)
    }

    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// The millisecond the id was made.
    pub fn millis(self) -> u64 {
        (self.0 >> 80) as u64
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = [0u8; ID_LEN];
        for (i, slot) in text.iter_mut().enumerate() {
            let shift = 5 * (ID_LEN - 1 - i);
            *slot = ALPHABET[((self.0 >> shift) & 0x1f) as usize];
        }
        f.write_str(std::str::from_utf8(&text).expect("ascii"))
    }
}

/// Why a text is not a message id.
#[derive(Debug, thiserror::Error)]
#[error("not a message id (expected 26 characters of Crockford base32)")]
pub struct BadId;

impl FromStr for MessageId {
    type Err = BadId;

    fn from_str(text: &str) -> Result<Self, BadId> {
        // 26 × 5 = 130 bits: the first character carries only 3
        if text.len() != ID_LEN || text.as_bytes()[0] > b'7' {
            return Err(BadId);
        }
        let mut value = 0u128;
        for byte in text.bytes() {
            let digit =
                ALPHABET.iter().position(|&c| c == byte.to_ascii_uppercase()).ok_or(BadId)?;
            value = (value << 5) | digit as u128;
        }
        Ok(MessageId(value))
    }
}

impl Serialize for MessageId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

// === time ===

pub fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `2026-11-25T06:21:30.123Z`: RFC 3339, UTC, milliseconds.
pub fn rfc3339(at: SystemTime) -> String {
    let millis = unix_millis(at);
    let (days, ms_of_day) = ((millis / 86_400_000) as i64, millis % 86_400_000);
    let (year, month, day) = civil_from_days(days);
    let secs = ms_of_day / 1000;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        ms_of_day % 1000
    )
}

/// Days since 1970-01-01 -> (year, month, day), proleptic Gregorian (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(millis)
    }

    #[test]
    fn the_envelope_has_the_exact_json_shape_and_keeps_the_payload_verbatim() {
        let payload = RawValue::from_string(r#"{"b": 1.50, "a": [true]}"#.into()).unwrap();
        let id: MessageId = "01JDQ3F4ZM0000000000000000".parse().unwrap();
        let mut envelope = Envelope::new(id, "orders.created", at(1_764_051_690_123), payload);
        envelope.metadata.insert("idempotency_key".into(), "k-1".into());
        envelope.error.push(ErrorRecord {
            status_code: Some(503),
            message: "busy".into(),
            stack_trace: String::new(),
            date: rfc3339(at(1_764_051_691_000)),
        });
        let json = String::from_utf8(envelope.to_json()).unwrap();
        assert_eq!(
            json,
            r#"{"id":"01JDQ3F4ZM0000000000000000","queue":"orders.created","dispatch_date":"2025-11-25T06:21:30.123Z","payload":{"b": 1.50, "a": [true]},"error":[{"status_code":503,"message":"busy","stack_trace":"","date":"2025-11-25T06:21:31.000Z"}],"metadata":{"idempotency_key":"k-1"}}"#
        );
        let back = Envelope::from_json(json.as_bytes()).unwrap();
        assert_eq!(back.payload.get(), r#"{"b": 1.50, "a": [true]}"#);
        assert_eq!(back.error, envelope.error);
        assert_eq!(back.id, id);
    }

    #[test]
    fn a_transport_failure_has_a_null_status_code() {
        let record = ErrorRecord {
            status_code: None,
            message: "connection refused".into(),
            stack_trace: String::new(),
            date: "2026-01-01T00:00:00.000Z".into(),
        };
        let json = serde_json::to_string(&record).unwrap();
        assert!(json.starts_with(r#"{"status_code":null,"#), "{json}");
    }

    #[test]
    fn ids_sort_by_time_as_numbers_and_as_text() {
        let mut ids: Vec<MessageId> = Vec::new();
        for millis in [1_000, 1_000, 1_000, 2_000, 2_000, 3_000] {
            ids.push(MessageId::generate(at(millis)));
        }
        // a later id made with an earlier clock still sorts after
        ids.push(MessageId::generate(at(500)));
        for pair in ids.windows(2) {
            assert!(pair[0] < pair[1]);
            assert!(pair[0].to_string() < pair[1].to_string());
        }
        assert_eq!(ids[0].millis(), 1_000);
        assert_eq!(ids[3].millis(), 2_000);
    }

    #[test]
    fn ids_render_in_26_characters_and_parse_back() {
        let id = MessageId::generate(at(1_764_051_690_123));
        let text = id.to_string();
        assert_eq!(text.len(), 26);
        assert_eq!(text.parse::<MessageId>().unwrap(), id);
        assert_eq!(text.to_ascii_lowercase().parse::<MessageId>().unwrap(), id);
        assert_eq!(MessageId::from_u128(u128::MAX).to_string(), "7ZZZZZZZZZZZZZZZZZZZZZZZZZ");
        for bad in ["", "8ZZZZZZZZZZZZZZZZZZZZZZZZZ", "01JDQ3F4ZM000000000000000U", "short"] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn dates_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(rfc3339(at(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(951_782_400_000)), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(at(4_102_444_799_999)), "2099-12-31T23:59:59.999Z");
    }
}
