//! `ByteSize`: an amount of bytes, `512`, `64KiB`, `1MiB`, `64KB`, or a Kubernetes quantity
//! `64Ki`, `128Mi`, `1G`. `KiB`/`MiB`/`GiB` and `Ki`/`Mi`/`Gi` are 1024-based, `KB`/`MB`/`GB`
//! and `K`/`M`/`G` 1000-based. Units ignore case (`64kib`, `64kb`, `64k`), except that a lone
//! `m` is refused: in a Kubernetes quantity it means thousandths, so `128m` is not 128 MB there.

use super::{ValueError, string_conversions};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

const KIB: u64 = 1024;
const UNITS: [(&str, u64); 7] = [
    ("GiB", KIB * KIB * KIB),
    ("MiB", KIB * KIB),
    ("KiB", KIB),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("B", 1),
];

/// What parses besides `UNITS`: Kubernetes quantity suffixes (a lone `m` is refused first).
const QUANTITIES: [(&str, u64); 6] = [
    ("Gi", KIB * KIB * KIB),
    ("Mi", KIB * KIB),
    ("Ki", KIB),
    ("G", 1_000_000_000),
    ("M", 1_000_000),
    ("K", 1_000),
];

const EXAMPLES: &str = "a whole number of bytes with an optional unit, e.g. 512, 64KiB, 64Ki, 1MiB";

/// A size in bytes from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct ByteSize(u64);

impl ByteSize {
    pub const fn from_bytes(bytes: u64) -> Self {
        ByteSize(bytes)
    }

    pub const fn kib(kib: u64) -> Self {
        ByteSize(kib * KIB)
    }

    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, ValueError> {
        let error = || ValueError::new(format!("{text:?} is not a size"), EXAMPLES);
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().map_err(|_| error())?;
        if unit == "m" {
            let message =
                format!("{text:?} is not a size: in a Kubernetes quantity m means thousandths");
            let expected = format!("{number}M for megabytes, or {number}Mi for mebibytes");
            return Err(ValueError::new(message, expected));
        }
        let scale = match unit {
            "" => 1,
            _ => scale_of(unit).ok_or_else(error)?,
        };
        number.checked_mul(scale).map(ByteSize).ok_or_else(error)
    }
}

fn scale_of(unit: &str) -> Option<u64> {
    UNITS.iter().chain(&QUANTITIES).find(|(name, _)| name.eq_ignore_ascii_case(unit)).map(|u| u.1)
}

/// The largest unit that divides the size exactly, binary units first: 65536 prints `64KiB`.
impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, size) = UNITS
            .iter()
            .find(|(_, size)| self.0 != 0 && self.0.is_multiple_of(*size))
            .unwrap_or(&("B", 1));
        write!(f, "{}{name}", self.0 / size)
    }
}

string_conversions!(ByteSize);

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(text: &str) -> Result<u64, String> {
        text.parse::<ByteSize>().map(ByteSize::bytes).map_err(|e| e.to_string())
    }

    #[test]
    fn binary_and_decimal_units() {
        assert_eq!(bytes("512"), Ok(512));
        assert_eq!(bytes("512B"), Ok(512));
        assert_eq!(bytes("64KiB"), Ok(65_536));
        assert_eq!(bytes("64kib"), Ok(65_536));
        assert_eq!(bytes("1MiB"), Ok(1_048_576));
        assert_eq!(bytes("2GiB"), Ok(2 * 1_073_741_824));
        assert_eq!(bytes("64KB"), Ok(64_000));
        assert_eq!(bytes("64kb"), Ok(64_000));
        assert_eq!(bytes("1MB"), Ok(1_000_000));
    }

    #[test]
    fn kubernetes_quantities_are_sizes() {
        assert_eq!(bytes("64Ki"), Ok(65_536));
        assert_eq!(bytes("128Mi"), Ok(128 * 1_048_576));
        assert_eq!(bytes("1Gi"), Ok(1_073_741_824));
        assert_eq!(bytes("64K"), Ok(64_000));
        assert_eq!(bytes("64k"), Ok(64_000));
        assert_eq!(bytes("128M"), Ok(128_000_000));
        assert_eq!(bytes("1G"), Ok(1_000_000_000));
        assert_eq!(bytes("64ki"), Ok(65_536));
    }

    #[test]
    fn a_lone_lowercase_m_is_refused_as_kubernetes_thousandths() {
        assert_eq!(
            bytes("128m"),
            Err(concat!(
                r#""128m" is not a size: in a Kubernetes quantity m means thousandths "#,
                "(expected 128M for megabytes, or 128Mi for mebibytes)"
            )
            .to_owned())
        );
        assert_eq!(bytes("128mb"), Ok(128_000_000), "accepted before quantities were");
    }

    #[test]
    fn refuses_other_text() {
        let err = bytes("lots").unwrap_err();
        assert_eq!(
            err,
            r#""lots" is not a size (expected a whole number of bytes with an optional unit, e.g. 512, 64KiB, 64Ki, 1MiB)"#
        );
        for bad in [
            "",
            "KiB",
            "Ki",
            "1.5MiB",
            "1.5Gi",
            "64 KiB",
            "64 Ki",
            "64XB",
            "64Ti",
            "-1",
            "99999999999Gi",
        ] {
            assert!(bytes(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn prints_back_what_it_parses() {
        for (text, printed) in
            [("65536", "64KiB"), ("1MiB", "1MiB"), ("64KB", "64KB"), ("513", "513B"), ("0", "0B")]
        {
            let size: ByteSize = text.parse().unwrap();
            assert_eq!(size.to_string(), printed);
            assert_eq!(printed.parse::<ByteSize>(), Ok(size));
        }
    }
}
