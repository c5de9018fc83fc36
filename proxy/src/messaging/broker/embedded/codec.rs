//! The bytes of a write in the log: integers little-endian, strings and byte strings with a u32
//! length before them. Written and read only by this store; each group commit's record begins
//! with [`FORMAT`], so that a log written by another layout is refused, not misread.

/// The layout of the records; raise it when a write's encoding changes.
pub(super) const FORMAT: u8 = 1;

/// Appends values to a record.
#[derive(Debug, Default)]
pub(super) struct Encoder {
    pub(super) bytes: Vec<u8>,
}

impl Encoder {
    pub(super) fn u8(&mut self, value: u8) {
        self.bytes.push(value);
    }

    pub(super) fn u32(&mut self, value: u32) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    pub(super) fn u64(&mut self, value: u64) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    pub(super) fn u128(&mut self, value: u128) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    pub(super) fn bytes(&mut self, value: &[u8]) {
        self.u32(u32::try_from(value.len()).expect("a value under 4 GiB"));
        self.bytes.extend_from_slice(value);
    }

    pub(super) fn str(&mut self, value: &str) {
        self.bytes(value.as_bytes());
    }

    pub(super) fn opt_str(&mut self, value: Option<&str>) {
        match value {
            None => self.u8(0),
            Some(value) => {
                self.u8(1);
                self.str(value);
            }
        }
    }
}

/// A record that does not decode: its checksum held, so the log was written by a build with
/// another layout, or by a bug.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a log record does not decode: {0}")]
pub struct Malformed(pub(super) &'static str);

/// Reads values back in the order they were written.
#[derive(Debug)]
pub(super) struct Decoder<'a> {
    bytes: &'a [u8],
}

impl<'a> Decoder<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Decoder { bytes }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.bytes.len() < n {
            return Err(Malformed("it ends early"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    pub(super) fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }

    pub(super) fn u32(&mut self) -> Result<u32, Malformed> {
        self.array().map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self) -> Result<u64, Malformed> {
        self.array().map(u64::from_le_bytes)
    }

    pub(super) fn u128(&mut self) -> Result<u128, Malformed> {
        self.array().map(u128::from_le_bytes)
    }

    pub(super) fn bytes(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    pub(super) fn string(&mut self) -> Result<String, Malformed> {
        let bytes = self.bytes()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Malformed("a string is not UTF-8"))
    }

    pub(super) fn opt_string(&mut self) -> Result<Option<String>, Malformed> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.string().map(Some),
            _ => Err(Malformed("an option is neither none nor some")),
        }
    }

    /// A count of items, each at least `min` bytes: bounded by what is left, so a bad count
    /// never reserves more than the record holds.
    pub(super) fn count(&mut self, min: usize) -> Result<usize, Malformed> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min.max(1)) > self.bytes.len() {
            return Err(Malformed("a count runs past the end"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_back_in_order() {
        let mut out = Encoder::default();
        out.u8(3);
        out.u64(u64::MAX - 1);
        out.u128(1 << 100);
        out.str("orders");
        out.opt_str(None);
        out.opt_str(Some("k"));
        out.bytes(b"{}");
        let mut input = Decoder::new(&out.bytes);
        assert_eq!(input.u8(), Ok(3));
        assert_eq!(input.u64(), Ok(u64::MAX - 1));
        assert_eq!(input.u128(), Ok(1 << 100));
        assert_eq!(input.string().as_deref(), Ok("orders"));
        assert_eq!(input.opt_string(), Ok(None));
        assert_eq!(input.opt_string(), Ok(Some("k".to_owned())));
        assert_eq!(input.bytes(), Ok(&b"{}"[..]));
        assert!(input.is_empty());
    }

    #[test]
    fn short_or_lying_input_is_malformed_not_a_panic() {
        assert!(Decoder::new(&[1, 2]).u32().is_err());
        // a length of 4 GiB over two bytes
        assert!(Decoder::new(&[0xff, 0xff, 0xff, 0xff, 0, 0]).bytes().is_err());
        assert!(Decoder::new(&[0xff, 0xff, 0xff, 0xff]).count(1).is_err());
        assert!(Decoder::new(&[2]).opt_string().is_err());
        assert!(Decoder::new(&[1, 0, 0, 0, 0xff]).string().is_err());
    }
}
