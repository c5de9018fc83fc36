//! `ByteSize`: an amount of bytes, `512`, `64KiB`, `1MiB`, `64KB`.
//! `KiB`/`MiB`/`GiB` are 1024-based and `KB`/`MB`/`GB` 1000-based, as in IEC units and
//! Kubernetes quantities; units ignore case, so `64kib` and `64kb` differ like their capitals.

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

const EXAMPLES: &str = "a whole number of bytes with an optional unit, e.g. 512, 64KiB, 1MiB";

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
        let scale = match unit {
            "" => 1,
            _ => {
                UNITS.iter().find(|(name, _)| name.eq_ignore_ascii_case(unit)).ok_or_else(error)?.1
            }
        };
        number.checked_mul(scale).map(ByteSize).ok_or_else(error)
    }
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
    fn refuses_other_text() {
        let err = bytes("lots").unwrap_err();
        assert_eq!(
            err,
            r#""lots" is not a size (expected a whole number of bytes with an optional unit, e.g. 512, 64KiB, 1MiB)"#
        );
        for bad in ["", "KiB", "1.5MiB", "64 KiB", "64XB", "-1", "99999999999999999999GiB"] {
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
