//! One record of the log on disk, and reading them back.
//!
//! A frame is a 16-byte header, then the payload:
//!
//! ```text
//! length: u32 LE (of the payload, never 0) | crc: u32 LE | lsn: u64 LE | payload
//! ```
//!
//! `crc` is CRC-32C (Castagnoli) over the length, the lsn and the payload, so a frame cut at any
//! byte, or one whose length was torn, fails its check. `lsn` numbers the records one by one:
//! a segment's records run on from the number in its name, so a stale record left behind by an
//! earlier use of a recycled segment (a smaller number) ends the reading as surely as a torn one.
//! Zeros (a segment written ahead, not yet used) read as a length of 0: the end.

/// Bytes before a frame's payload.
pub(crate) const HEADER: usize = 16;

/// One record read back: its number and its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame<'a> {
    pub(crate) lsn: u64,
    pub(crate) payload: &'a [u8],
}

/// Appends a frame holding `payload` as record `lsn` to `out`.
pub(crate) fn encode(out: &mut Vec<u8>, lsn: u64, payload: &[u8]) {
    let length = u32::try_from(payload.len()).expect("a log record is under 4 GiB");
    assert!(length > 0, "a log record is never empty");
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(&checksum(length, lsn, payload).to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(payload);
}

/// The frames of `bytes`, the first numbered `first`, each next one the number after; stops at
/// the first frame that is zero, cut short, numbered otherwise, or fails its checksum.
pub(crate) fn frames(bytes: &[u8], first: u64) -> Frames<'_> {
    Frames { bytes, at: 0, next: first }
}

/// Reads frames; [`Frames::end`] is where the whole ones end, after the iteration.
#[derive(Debug)]
pub(crate) struct Frames<'a> {
    bytes: &'a [u8],
    at: usize,
    next: u64,
}

impl Frames<'_> {
    /// The offset just past the last whole frame read so far.
    pub(crate) fn end(&self) -> usize {
        self.at
    }

    /// The number the next frame would have.
    pub(crate) fn next_lsn(&self) -> u64 {
        self.next
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Frame<'a>;

    fn next(&mut self) -> Option<Frame<'a>> {
        let rest = self.bytes.get(self.at..)?;
        let header: &[u8; HEADER] = rest.get(..HEADER)?.try_into().ok()?;
        let length = u32::from_le_bytes(header[0..4].try_into().ok()?);
        let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
        let lsn = u64::from_le_bytes(header[8..16].try_into().ok()?);
        // the number after the last possible one would wrap: the log ends there
        let after = self.next.checked_add(1)?;
        if length == 0 || lsn != self.next {
            return None;
        }
        let payload = rest.get(HEADER..HEADER.checked_add(length as usize)?)?;
        if checksum(length, lsn, payload) != crc {
            return None;
        }
        self.at += HEADER + payload.len();
        self.next = after;
        Some(Frame { lsn, payload })
    }
}

fn checksum(length: u32, lsn: u64, payload: &[u8]) -> u32 {
    let crc = crc32c(!0, &length.to_le_bytes());
    let crc = crc32c(crc, &lsn.to_le_bytes());
    !crc32c(crc, payload)
}

/// CRC-32C, bytewise from a table built at compile time: the log checks each record once when
/// written and once at recovery, so a table is fast enough, and needs no dependency.
fn crc32c(mut crc: u32, bytes: &[u8]) -> u32 {
    for &byte in bytes {
        crc = TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

const TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            // 0x82F63B78: the Castagnoli polynomial, reflected
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    fn log(records: &[&[u8]], first: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, payload) in records.iter().enumerate() {
            encode(&mut out, first + n as u64, payload);
        }
        out
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // RFC 3720 / the CRC catalogue: CRC-32C of "123456789"
        assert_eq!(!crc32c(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn frames_read_back_in_order_and_stop_at_zeros() {
        let mut bytes = log(&[b"one", b"two", b"three"], 7);
        let whole = bytes.len();
        bytes.extend_from_slice(&[0; 64]);
        let mut frames = frames(&bytes, 7);
        let read: Vec<(u64, &[u8])> = frames.by_ref().map(|f| (f.lsn, f.payload)).collect();
        assert_eq!(read, vec![(7, &b"one"[..]), (8, &b"two"[..]), (9, &b"three"[..])]);
        assert_eq!((frames.end(), frames.next_lsn()), (whole, 10));
    }

    #[test]
    fn a_record_cut_at_any_byte_is_dropped_and_the_ones_before_it_kept() {
        let bytes = log(&[b"kept", b"the torn one"], 1);
        let first = HEADER + 4;
        for cut in first..bytes.len() {
            let mut frames = frames(&bytes[..cut], 1);
            assert_eq!(frames.by_ref().count(), 1, "cut at {cut}");
            assert_eq!(frames.end(), first, "cut at {cut}");
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_in_a_record_fails_its_checksum() {
        let bytes = log(&[b"payload"], 1);
        for at in 0..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[at] ^= 1 << bit;
                assert_eq!(frames(&bad, 1).count(), 0, "bit {bit} of byte {at}");
            }
        }
    }

    #[test]
    fn a_stale_record_of_a_recycled_segment_ends_the_reading() {
        // the segment held records 1..=3 before; it now starts at 10 with one record
        let mut bytes = log(&[b"old one", b"old two", b"old three"], 1);
        let new = log(&[b"new"], 10);
        bytes[..new.len()].copy_from_slice(&new);
        let read: Vec<u64> = frames(&bytes, 10).map(|f| f.lsn).collect();
        assert_eq!(read, vec![10]);
    }

    #[test]
    fn the_last_possible_number_ends_the_log_instead_of_wrapping() {
        let bytes = log(&[b"last"], u64::MAX);
        assert_eq!(frames(&bytes, u64::MAX).count(), 0);
    }
}
