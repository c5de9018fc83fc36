//! Values that cannot be wrong: each checks its YAML text in `TryFrom`, so a bad value is
//! reported at its own line and column, and code past `load` never checks it again.
//! Each serializes back to the text it accepts (for `/v1/config`), secrets redacted, and
//! echoes a refused text in its error through `redact`.

mod broker;
mod duration;
mod names;
mod net;
mod postgres;
mod redact;
mod size;

pub use broker::{Broker, NatsUrl, RedisClusterUrl, RedisUrl};
pub use duration::Duration;
pub use names::{QueueName, UpstreamName};
pub use net::{AppUrl, Endpoint, ListenAddr, NameServer};
pub use postgres::{PostgresUrl, TableName};
pub use size::ByteSize;

pub(crate) use net::HttpUrl;
pub(crate) use redact::redact;

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a value was refused, in the shape of every config problem: `message (expected ...)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueError {
    message: String,
    expected: String,
}

impl ValueError {
    pub(crate) fn new(message: impl Into<String>, expected: impl Into<String>) -> Self {
        ValueError { message: message.into(), expected: expected.into() }
    }
}

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (expected {})", self.message, self.expected)
    }
}

impl std::error::Error for ValueError {}

/// A share of requests from 0 to 100 inclusive, decimals allowed (`0.5` is one in two hundred):
/// fault injection.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Deserialize, Serialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Percent(f64);

impl Percent {
    pub fn get(self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for Percent {
    type Error = ValueError;

    fn try_from(value: f64) -> Result<Self, ValueError> {
        match (0.0..=100.0).contains(&value) {
            true => Ok(Percent(value)),
            false => Err(ValueError::new(
                format!("{value} is out of range"),
                "a percentage from 0 to 100, decimals allowed, e.g. 5 or 0.1",
            )),
        }
    }
}

impl From<Percent> for f64 {
    fn from(percent: Percent) -> f64 {
        percent.0
    }
}

/// A fraction from 0.0 to 1.0 inclusive: failure rates, retry budgets, sample ratios.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Deserialize, Serialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Ratio(f64);

impl Ratio {
    pub(crate) const fn new_const(value: f64) -> Self {
        Ratio(value)
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for Ratio {
    type Error = ValueError;

    fn try_from(value: f64) -> Result<Self, ValueError> {
        match (0.0..=1.0).contains(&value) {
            true => Ok(Ratio(value)),
            false => Err(ValueError::new(
                format!("{value} is out of range"),
                "a number from 0.0 to 1.0, e.g. 0.2",
            )),
        }
    }
}

impl From<Ratio> for f64 {
    fn from(ratio: Ratio) -> f64 {
        ratio.0
    }
}

/// Implements `TryFrom<String>` through `FromStr`, and `From<T> for String` through
/// `Display`: the two conversions `#[serde(try_from, into)]` needs.
macro_rules! string_conversions {
    ($($ty:ty),*) => {$(
        impl TryFrom<String> for $ty {
            type Error = $crate::types::ValueError;

            fn try_from(text: String) -> Result<Self, Self::Error> {
                text.parse()
            }
        }

        impl From<$ty> for String {
            fn from(value: $ty) -> String {
                value.to_string()
            }
        }
    )*};
}
pub(crate) use string_conversions;

/// Is `host` an IP address or a DNS name (letters, digits, `-`, `_`, dots between labels)?
pub(crate) fn is_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    (1..=253).contains(&host.len()) && host.trim_end_matches('.').split('.').all(label_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_accepts_zero_to_one_only() {
        assert_eq!(Ratio::try_from(0.0).map(Ratio::get), Ok(0.0));
        assert_eq!(Ratio::try_from(1.0).map(Ratio::get), Ok(1.0));
        let err = Ratio::try_from(1.5).unwrap_err().to_string();
        assert_eq!(err, "1.5 is out of range (expected a number from 0.0 to 1.0, e.g. 0.2)");
        assert!(Ratio::try_from(f64::NAN).is_err());
    }

    #[test]
    fn hosts_are_ips_or_dns_names() {
        for ok in ["127.0.0.1", "::1", "payments", "api.example.com", "_http._tcp.x.local"] {
            assert!(is_host(ok), "{ok}");
        }
        for bad in ["", "a b", "-x", "x..y", "a/b"] {
            assert!(!is_host(bad), "{bad}");
        }
    }
}
