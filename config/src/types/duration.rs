//! `Duration`: a span of time written `250ms`, `5s`, `1m30s`, `1.5s`, `14d`.
//! A bare number is refused (`"5" is not a duration`): `timeout: 5` could mean seconds or
//! milliseconds, and a wrong guess is a silent outage. Decimals are exact, not floats.

use super::{ValueError, string_conversions};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Units from largest to smallest, as `Display` writes them.
const UNITS: [(&str, u128); 7] = [
    ("d", 86_400 * NANOS_PER_SEC),
    ("h", 3_600 * NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("s", NANOS_PER_SEC),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

const EXAMPLES: &str = "e.g. 250ms, 5s, 1m";

/// A duration from the config: `get()` is the `std::time::Duration`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Deserialize, Serialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Duration(std::time::Duration);

impl Duration {
    pub const fn from_millis(millis: u64) -> Self {
        Duration(std::time::Duration::from_millis(millis))
    }

    pub const fn from_secs(secs: u64) -> Self {
        Duration(std::time::Duration::from_secs(secs))
    }

    pub fn get(self) -> std::time::Duration {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<std::time::Duration> for Duration {
    fn from(d: std::time::Duration) -> Self {
        Duration(d)
    }
}

impl FromStr for Duration {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, ValueError> {
        let nanos = parse_nanos(text)
            .ok_or_else(|| ValueError::new(format!("{text:?} is not a duration"), EXAMPLES))?;
        let secs = u64::try_from(nanos / NANOS_PER_SEC)
            .map_err(|_| ValueError::new(format!("{text:?} is too long"), EXAMPLES))?;
        let subsec = u32::try_from(nanos % NANOS_PER_SEC).expect("below one second");
        Ok(Duration(std::time::Duration::new(secs, subsec)))
    }
}

/// `1h30m`, `1.5s`: one or more number-unit pairs, summed.
fn parse_nanos(text: &str) -> Option<u128> {
    let mut rest = text;
    let mut total: u128 = 0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (number, after) = rest.split_at(number_end);
        let unit_end = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        let scale = match unit {
            "µs" => 1_000,
            _ => UNITS.iter().find(|(name, _)| *name == unit)?.1,
        };
        total = total.checked_add(parse_scaled(number, scale)?)?;
        rest = after;
    }
    Some(total)
}

/// `number` × `scale`, where `number` may have a fraction; digits below a nanosecond are dropped.
fn parse_scaled(number: &str, scale: u128) -> Option<u128> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
        return None;
    }
    let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
    let mut nanos = whole.checked_mul(scale)?;
    if !fraction.is_empty() {
        let denominator = 10u128.pow(u32::try_from(fraction.len()).ok()?);
        nanos += fraction.parse::<u128>().ok()? * scale / denominator;
    }
    Some(nanos)
}

/// The compact form, largest units first: `90s` prints as `1m30s`, `1.5s` as `1s500ms`.
impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut nanos = self.0.as_nanos();
        if nanos == 0 {
            return f.write_str("0s");
        }
        for (name, size) in UNITS {
            if nanos >= size {
                write!(f, "{}{name}", nanos / size)?;
                nanos %= size;
            }
        }
        Ok(())
    }
}

string_conversions!(Duration);

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration as Std;

    fn parse(text: &str) -> Result<Std, String> {
        text.parse::<Duration>().map(Duration::get).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(parse("250ms"), Ok(Std::from_millis(250)));
        assert_eq!(parse("5s"), Ok(Std::from_secs(5)));
        assert_eq!(parse("1m"), Ok(Std::from_secs(60)));
        assert_eq!(parse("1h"), Ok(Std::from_secs(3600)));
        assert_eq!(parse("14d"), Ok(Std::from_secs(14 * 86_400)));
        assert_eq!(parse("1.5s"), Ok(Std::from_millis(1500)));
        assert_eq!(parse("100us"), Ok(Std::from_micros(100)));
        assert_eq!(parse("100µs"), Ok(Std::from_micros(100)));
        assert_eq!(parse("1m30s"), Ok(Std::from_secs(90)));
        assert_eq!(parse("0s"), Ok(Std::ZERO));
        assert_eq!(parse(".5s"), Ok(Std::from_millis(500)));
    }

    #[test]
    fn refuses_what_is_not_a_duration() {
        let err = parse("3 seconds").unwrap_err();
        assert_eq!(err, r#""3 seconds" is not a duration (expected e.g. 250ms, 5s, 1m)"#);
        for bad in ["", "5", "s", "5 s", "1.2.3s", "-1s", "5sec", "1e3s"] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(parse("999999999999999999999d").is_err());
    }

    #[test]
    fn prints_back_what_it_parses() {
        for text in ["0s", "250ms", "5s", "1m", "1m30s", "1s500ms", "14d", "100us", "1h1ns"] {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.to_string(), text);
            assert_eq!(d.to_string().parse::<Duration>(), Ok(d));
        }
        assert_eq!("90s".parse::<Duration>().unwrap().to_string(), "1m30s");
    }
}
