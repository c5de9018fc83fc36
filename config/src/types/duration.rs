//! `Duration`: a span of time written `250ms`, `5s`, `1m30s`, `1.5s`, `14d`, at most `365d`.
//! A bare number is refused (`"5" is not a duration`): `timeout: 5` could mean seconds or
//! milliseconds, and a wrong guess is a silent outage. Decimals are exact, not floats.
//! The cap keeps every `Instant + duration` and every conversion to whole milliseconds in range,
//! so no value that validates can panic or wrap at run time.

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

/// The longest duration any field takes: 365 days. No field needs more (the longest defaults
/// are `dead_letter_retention.max_age`'s 14d and `dedup_window`'s 1h; a lease, a timeout or a
/// drain of a year already means "never"), and one bound for every field is one rule to learn.
/// A year is far inside what `Instant`, tokio's timer and the stores' millisecond counts hold.
const MAX_SECS: u64 = 365 * 86_400;

/// A duration from the config: `get()` is the `std::time::Duration`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Deserialize, Serialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Duration(std::time::Duration);

impl Duration {
    /// The longest a duration may be: `365d`. Longer text is refused when parsed.
    pub const MAX: Duration = Duration(std::time::Duration::from_secs(MAX_SECS));

    /// For defaults and tests; clamped to [`Duration::MAX`], like every other constructor.
    pub const fn from_millis(millis: u64) -> Self {
        match millis / 1_000 >= MAX_SECS {
            true => Duration::MAX,
            false => Duration(std::time::Duration::from_millis(millis)),
        }
    }

    /// For defaults and tests; clamped to [`Duration::MAX`].
    pub const fn from_secs(secs: u64) -> Self {
        match secs >= MAX_SECS {
            true => Duration::MAX,
            false => Duration(std::time::Duration::from_secs(secs)),
        }
    }

    pub fn get(self) -> std::time::Duration {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }

    /// Text in the same syntax from outside the config (a request header, say), where a value
    /// past [`Duration::MAX`] means "no sooner than that" and is cut to it rather than refused.
    /// `None` when the text is not a duration. Allocates nothing.
    pub fn parse_saturating(text: &str) -> Option<Self> {
        let nanos = parse_nanos(text)?.min(Duration::MAX.0.as_nanos());
        let secs = u64::try_from(nanos / NANOS_PER_SEC).expect("at most MAX_SECS");
        let subsec = u32::try_from(nanos % NANOS_PER_SEC).expect("below one second");
        Some(Duration(std::time::Duration::new(secs, subsec)))
    }
}

/// Clamped to [`Duration::MAX`]: a config value is never longer, however it was made.
impl From<std::time::Duration> for Duration {
    fn from(d: std::time::Duration) -> Self {
        Duration(d.min(Duration::MAX.0))
    }
}

impl FromStr for Duration {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, ValueError> {
        let nanos = parse_nanos(text)
            .ok_or_else(|| ValueError::new(format!("{text:?} is not a duration"), EXAMPLES))?;
        // compared in nanoseconds, before any conversion can truncate (`18446744073709551617ms`
        // must not wrap around to 1ms)
        if nanos > Duration::MAX.0.as_nanos() {
            let expected = format!("at most {}, e.g. 250ms, 5s, 1m", Duration::MAX);
            return Err(ValueError::new(format!("{text:?} is too long"), expected));
        }
        let secs = u64::try_from(nanos / NANOS_PER_SEC).expect("at most MAX_SECS");
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
    fn parse_saturating_cuts_long_text_to_the_cap_and_refuses_what_is_not_a_duration() {
        let sat = |t: &str| Duration::parse_saturating(t).map(Duration::get);
        assert_eq!(sat("1500ms"), Some(Std::from_millis(1500)));
        assert_eq!(sat("1.5s"), Some(Std::from_millis(1500)));
        assert_eq!(sat("0ms"), Some(Std::ZERO));
        assert_eq!(sat("366d"), Some(Duration::MAX.get()));
        assert_eq!(sat("99999999999999999999d"), Some(Duration::MAX.get()));
        for bad in
            ["", "5", "1500", "ms", "-1s", "1 s", "1500MS", "1e3ms", "123456789012345678901ms"]
        {
            assert_eq!(sat(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn refuses_anything_longer_than_365_days() {
        assert_eq!(parse("365d"), Ok(Std::from_secs(365 * 86_400)));
        assert_eq!(parse("364d23h59m59s999999999ns"), Ok(Std::new(365 * 86_400 - 1, 999_999_999)));
        let err = parse("200000000000000d").unwrap_err();
        assert_eq!(
            err,
            r#""200000000000000d" is too long (expected at most 365d, e.g. 250ms, 5s, 1m)"#
        );
        // past u64 milliseconds: refused, not wrapped around to 1ms
        for long in ["365d1ns", "366d", "8761h", "18446744073709551617ms", "99999999999999999999s"]
        {
            assert!(
                parse(long)
                    .unwrap_err()
                    .ends_with("is too long (expected at most 365d, e.g. 250ms, 5s, 1m)"),
                "{long}"
            );
        }
    }

    #[test]
    fn constructors_in_code_never_exceed_the_maximum() {
        assert_eq!(Duration::from_secs(u64::MAX), Duration::MAX);
        assert_eq!(Duration::from_millis(u64::MAX), Duration::MAX);
        assert_eq!(Duration::from(Std::MAX), Duration::MAX);
        assert_eq!(Duration::from_secs(30).get(), Std::from_secs(30));
        assert_eq!(Duration::MAX.to_string(), "365d");
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
