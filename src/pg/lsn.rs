//! Log sequence numbers: positions in the WAL stream, their textual form
//! `X/X`, and the segment each falls in.

use crate::error::{Error, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// PostgreSQL's textual LSN form, `X/X`.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    let ok = |p: &str| !p.is_empty() && p.len() <= 8 && p.bytes().all(|b| b.is_ascii_hexdigit());
    if !ok(hi) || !ok(lo) {
        return None;
    }
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// An LSN, serialized in PostgreSQL's `X/X` form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The number of the segment holding this LSN, counted from LSN 0. A
    /// segment size of 0 (never valid) counts as 1 instead of dividing by it.
    pub fn segno(self, seg_size: u32) -> u64 {
        self.0 / u64::from(seg_size.max(1))
    }

    /// The LSN at which the segment holding this one starts.
    pub fn segment_start(self, seg_size: u32) -> Lsn {
        Lsn::of_segno(self.segno(seg_size), seg_size)
    }

    /// The LSN at which segment number `segno` starts.
    pub fn of_segno(segno: u64, seg_size: u32) -> Lsn {
        Lsn(segno * u64::from(seg_size.max(1)))
    }

    /// The segment holding this LSN on `timeline`.
    pub fn segment(self, timeline: u32, seg_size: u32) -> crate::pg::wal::SegmentName {
        crate::pg::wal::SegmentName::of_segno(timeline, self.segno(seg_size), seg_size)
    }

    /// The segments WAL from `self` up to `stop` lies in, `stop` itself
    /// excluded: the last holds the byte before `stop`, so a stop on a
    /// segment boundary needs nothing of the segment starting there. Never
    /// empty: a `stop` at or before `self` still needs `self`'s segment.
    pub fn segnos_until(self, stop: Lsn, seg_size: u32) -> std::ops::RangeInclusive<u64> {
        let first = self.segno(seg_size);
        first..=Lsn(stop.0.saturating_sub(1)).segno(seg_size).max(first)
    }

    /// The segments from `self`'s to the one holding `stop` itself: a stop
    /// on a segment boundary also takes the segment starting there (whose
    /// first record is the one at `stop`). Never empty.
    pub fn segnos_through(self, stop: Lsn, seg_size: u32) -> std::ops::RangeInclusive<u64> {
        let first = self.segno(seg_size);
        first..=stop.segno(seg_size).max(first)
    }
}

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format_lsn(self.0))
    }
}

impl std::str::FromStr for Lsn {
    type Err = Error;
    fn from_str(s: &str) -> Result<Lsn> {
        parse_lsn(s).map(Lsn).ok_or_else(|| {
            Error::usage(format!(
                "'{s}' is not an LSN (expected the form 16/B374D848)"
            ))
        })
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Lsn, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e: Error| serde::de::Error::custom(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text() {
        assert_eq!(format_lsn(0x1_0000_0028), "1/28");
        assert_eq!(parse_lsn("1/28"), Some(0x1_0000_0028));
        assert_eq!(parse_lsn("1/"), None);
        assert_eq!(parse_lsn("x/1"), None);
    }

    const MB16: u32 = 1 << 24;

    #[test]
    fn segments() {
        assert_eq!(Lsn(0).segno(MB16), 0);
        assert_eq!(Lsn((5 << 24) - 1).segno(MB16), 4);
        assert_eq!(Lsn(5 << 24).segno(MB16), 5);
        assert_eq!(Lsn(0x1_0000_0028).segno(MB16), 256);
        assert_eq!(Lsn((5 << 24) + 0x28).segment_start(MB16), Lsn(5 << 24));
        assert_eq!(Lsn::of_segno(256, MB16), Lsn(0x1_0000_0000));
        assert_eq!(
            Lsn(0x1_0300_0028).segment(2, MB16).to_string(),
            "000000020000000100000003"
        );
        assert_eq!(
            Lsn(u64::MAX).segment(1, MB16).to_string(),
            "00000001FFFFFFFF000000FF"
        );
        // 1 MiB segments: 4096 per log file.
        assert_eq!(
            Lsn(0x1_0000_0000).segment(1, 1 << 20).to_string(),
            "000000010000000100000000"
        );
        // Never a division by zero.
        assert_eq!(Lsn(7).segno(0), 7);
    }

    #[test]
    fn spans() {
        let at = |seg: u64, off: u64| Lsn((seg << 24) + off);
        // Inside segments.
        assert_eq!(at(2, 0x28).segnos_until(at(4, 0x28), MB16), 2..=4);
        assert_eq!(at(2, 0x28).segnos_through(at(4, 0x28), MB16), 2..=4);
        // A stop on a boundary: `until` leaves the segment starting there out.
        assert_eq!(at(2, 0x28).segnos_until(at(4, 0), MB16), 2..=3);
        assert_eq!(at(2, 0x28).segnos_through(at(4, 0), MB16), 2..=4);
        // Stop at or before the start: the start's segment alone.
        assert_eq!(at(2, 0x28).segnos_until(at(2, 0x28), MB16), 2..=2);
        assert_eq!(at(5, 0).segnos_until(Lsn(1), MB16), 5..=5);
        assert_eq!(at(5, 0).segnos_through(Lsn(1), MB16), 5..=5);
        assert_eq!(Lsn(0).segnos_until(Lsn(0), MB16), 0..=0);
        assert_eq!(
            Lsn(0).segnos_until(Lsn(u64::MAX), MB16),
            0..=(u64::MAX >> 24)
        );
    }
}
