//! PostgreSQL WAL file names and the segment page header.
//!
//! Names are parsed before any I/O so that nothing PostgreSQL did not produce
//! (a path, `../x`, a typo) can ever become a repository key.

use crate::pg::lsn::format_lsn;
use std::fmt;

/// Timeline, log and segment number as they appear in a segment's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentName {
    pub timeline: u32,
    pub log: u32,
    pub seg: u32,
}

impl SegmentName {
    /// The segment number counted from LSN 0 for a given segment size.
    pub fn segno(&self, segment_size: u32) -> u64 {
        let per_log = 0x1_0000_0000u64 / u64::from(segment_size);
        u64::from(self.log) * per_log + u64::from(self.seg)
    }

    /// The LSN at which this segment starts.
    pub fn start_lsn(&self, segment_size: u32) -> u64 {
        self.segno(segment_size) * u64::from(segment_size)
    }

    /// The segment that holds `lsn` on `timeline`.
    pub fn containing(timeline: u32, lsn: u64, segment_size: u32) -> SegmentName {
        SegmentName::of_segno(timeline, lsn / u64::from(segment_size), segment_size)
    }

    /// Segment number `segno` (counted from LSN 0) on `timeline`.
    pub fn of_segno(timeline: u32, segno: u64, segment_size: u32) -> SegmentName {
        let per_log = 0x1_0000_0000u64 / u64::from(segment_size);
        SegmentName {
            timeline,
            log: (segno / per_log) as u32,
            seg: (segno % per_log) as u32,
        }
    }

    /// The next segment on the same timeline.
    pub fn next(&self, segment_size: u32) -> SegmentName {
        let per_log = 0x1_0000_0000u64 / u64::from(segment_size);
        let segno = self.segno(segment_size) + 1;
        SegmentName {
            timeline: self.timeline,
            log: (segno / per_log) as u32,
            seg: (segno % per_log) as u32,
        }
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}{:08X}{:08X}", self.timeline, self.log, self.seg)
    }
}

/// Every kind of file PostgreSQL hands to `archive_command`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WalFileName {
    /// `TTTTTTTTLLLLLLLLSSSSSSSS`
    Segment(SegmentName),
    /// `<segment>.partial`, written at promotion.
    Partial(SegmentName),
    /// `<segment>.<offset>.backup`, a backup history file.
    BackupHistory(SegmentName, u32),
    /// `TTTTTTTT.history`
    TimelineHistory(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidName(pub String);

impl fmt::Display for InvalidName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "'{}' is not a PostgreSQL WAL file name (expected a 24-hex-digit segment, \
             TTTTTTTT.history, <segment>.partial or <segment>.<offset>.backup)",
            self.0.escape_debug()
        )
    }
}

fn hex_u32(s: &str) -> Option<u32> {
    // PostgreSQL writes upper-case hex only (IsXLogFileName); from_str_radix
    // alone would also take lower case and a leading '+'.
    if s.len() == 8 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F')) {
        u32::from_str_radix(s, 16).ok()
    } else {
        None
    }
}

fn parse_segment(s: &str) -> Option<SegmentName> {
    if s.len() != 24 || !s.is_ascii() {
        return None;
    }
    let segment = SegmentName {
        timeline: hex_u32(&s[0..8])?,
        log: hex_u32(&s[8..16])?,
        seg: hex_u32(&s[16..24])?,
    };
    // Timeline 0 does not exist in PostgreSQL.
    (segment.timeline != 0).then_some(segment)
}

impl WalFileName {
    pub fn parse(name: &str) -> Result<WalFileName, InvalidName> {
        let invalid = || InvalidName(name.to_string());
        if !name.is_ascii() {
            return Err(invalid());
        }
        if let Some(segment) = parse_segment(name) {
            return Ok(WalFileName::Segment(segment));
        }
        if let Some(tli) = name.strip_suffix(".history") {
            return match hex_u32(tli) {
                Some(t) if t != 0 => Ok(WalFileName::TimelineHistory(t)),
                _ => Err(invalid()),
            };
        }
        if let Some(seg) = name.strip_suffix(".partial") {
            return parse_segment(seg)
                .map(WalFileName::Partial)
                .ok_or_else(invalid);
        }
        if let Some(rest) = name.strip_suffix(".backup")
            && rest.len() == 24 + 1 + 8
            && rest.as_bytes()[24] == b'.'
        {
            let segment = parse_segment(&rest[..24]).ok_or_else(invalid)?;
            let offset = hex_u32(&rest[25..]).ok_or_else(invalid)?;
            return Ok(WalFileName::BackupHistory(segment, offset));
        }
        Err(invalid())
    }

    /// The segment whose header the file carries (segments and partial segments).
    pub fn segment_with_header(&self) -> Option<SegmentName> {
        match self {
            WalFileName::Segment(s) | WalFileName::Partial(s) => Some(*s),
            _ => None,
        }
    }

    pub fn timeline(&self) -> u32 {
        match self {
            WalFileName::Segment(s)
            | WalFileName::Partial(s)
            | WalFileName::BackupHistory(s, _) => s.timeline,
            WalFileName::TimelineHistory(t) => *t,
        }
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalFileName::Segment(s) => write!(f, "{s}"),
            WalFileName::Partial(s) => write!(f, "{s}.partial"),
            WalFileName::BackupHistory(s, off) => write!(f, "{s}.{off:08X}.backup"),
            WalFileName::TimelineHistory(t) => write!(f, "{t:08X}.history"),
        }
    }
}

/// XLP_LONG_HEADER: set on the first page of every segment.
const XLP_LONG_HEADER: u16 = 0x0002;
/// Size of XLogLongPageHeaderData on 64-bit platforms.
pub const LONG_PAGE_HEADER_SIZE: usize = 40;

/// The fields of a segment's first page header that identify it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub magic: u16,
    pub timeline: u32,
    pub page_address: u64,
    pub system_identifier: u64,
    pub segment_size: u32,
    pub block_size: u32,
}

/// The WAL page magic of each supported major version (XLOG_PAGE_MAGIC in
/// xlog_internal.h); it changes whenever the WAL format does.
/// Every major version PostgreSQL still maintains; anything else is refused
/// by name, so an unknown format is never archived as if it were understood.
const PAGE_MAGICS: &[(u16, u32)] = &[
    (0xD106, 13),
    (0xD10D, 14),
    (0xD110, 15),
    (0xD113, 16),
    (0xD116, 17),
    (0xD118, 18),
];

/// The oldest and newest major versions this build understands.
pub const SUPPORTED_VERSIONS: (u32, u32) = (13, 18);

pub fn pg_version_for_magic(magic: u16) -> Option<u32> {
    PAGE_MAGICS
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, v)| *v)
}

/// Names the magic found and the versions supported; a magic past the newest
/// known one most likely comes from a newer PostgreSQL than this build knows.
fn unsupported_magic(magic: u16) -> String {
    let (oldest, newest) = SUPPORTED_VERSIONS;
    let newest_magic = PAGE_MAGICS.last().map_or(0, |(m, _)| *m);
    let hint = if magic > newest_magic && magic & 0xFF00 == 0xD100 {
        format!(" (a PostgreSQL newer than {newest}?): install a walvault release that supports it")
    } else {
        String::new()
    };
    format!(
        "WAL page magic 0x{magic:04X} is not that of PostgreSQL {oldest} to {newest}, \
         the versions this build of walvault supports{hint}"
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidHeader(pub String);

impl fmt::Display for InvalidHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl SegmentHeader {
    /// Parses the long page header at the start of a segment (little-endian, as
    /// written by PostgreSQL on x86-64 and aarch64).
    pub fn parse(bytes: &[u8]) -> Result<SegmentHeader, InvalidHeader> {
        if bytes.len() < LONG_PAGE_HEADER_SIZE {
            return Err(InvalidHeader(format!(
                "file is {} bytes, too short for a WAL page header",
                bytes.len()
            )));
        }
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        let header = SegmentHeader {
            magic: u16_at(0),
            timeline: u32_at(4),
            page_address: u64_at(8),
            system_identifier: u64_at(24),
            segment_size: u32_at(32),
            block_size: u32_at(36),
        };
        if pg_version_for_magic(header.magic).is_none() {
            return Err(InvalidHeader(unsupported_magic(header.magic)));
        }
        if u16_at(2) & XLP_LONG_HEADER == 0 {
            return Err(InvalidHeader(
                "first page lacks the long header every segment starts with".into(),
            ));
        }
        let size = header.segment_size;
        if !size.is_power_of_two() || !(1 << 20..=1 << 30).contains(&size) {
            return Err(InvalidHeader(format!(
                "segment size {size} in the header is not a power of two between 1 MiB and 1 GiB"
            )));
        }
        Ok(header)
    }

    pub fn pg_version(&self) -> u32 {
        pg_version_for_magic(self.magic).unwrap_or(0)
    }

    /// Checks that the header belongs to the segment the file is named after.
    pub fn check_matches(&self, name: SegmentName) -> Result<(), InvalidHeader> {
        // First: a segment number past the end of its log would overflow the LSN.
        if name.seg as u64 >= 0x1_0000_0000u64 / u64::from(self.segment_size) {
            return Err(InvalidHeader(format!(
                "segment number {:08X} does not exist with {} MiB segments",
                name.seg,
                self.segment_size >> 20
            )));
        }
        let expected = name.start_lsn(self.segment_size);
        if self.page_address != expected {
            return Err(InvalidHeader(format!(
                "its header says it starts at LSN {} but the name {name} means {}",
                format_lsn(self.page_address),
                format_lsn(expected)
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_every_kind() {
        assert_eq!(
            WalFileName::parse("00000001000000000000000A").unwrap(),
            WalFileName::Segment(SegmentName {
                timeline: 1,
                log: 0,
                seg: 10
            })
        );
        assert_eq!(
            WalFileName::parse("00000002.history").unwrap(),
            WalFileName::TimelineHistory(2)
        );
        assert!(matches!(
            WalFileName::parse("000000010000000000000003.partial").unwrap(),
            WalFileName::Partial(_)
        ));
        assert_eq!(
            WalFileName::parse("000000010000000000000002.00000028.backup").unwrap(),
            WalFileName::BackupHistory(
                SegmentName {
                    timeline: 1,
                    log: 0,
                    seg: 2
                },
                0x28
            )
        );
    }

    #[test]
    fn refuses_bad_names() {
        for bad in [
            "",
            "../000000010000000000000001",
            "pg_wal/000000010000000000000001",
            "00000001000000000000000",
            "0000000100000000000000001",
            "00000001000000000000000G",
            "+0000001000000000000000A",
            "00000000000000000000000A",
            "00000000.history",
            "0000001.history",
            "000000010000000000000001.backup",
            "000000010000000000000001.0000002.backup",
            "000000010000000000000001.partial.partial",
            "00000001000000000000000é",
            "RECOVERYXLOG",
            "0000000100000000000000aa",
        ] {
            assert!(WalFileName::parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    fn header_bytes(magic: u16, info: u16, addr: u64, sysid: u64, size: u32) -> Vec<u8> {
        let mut b = vec![0u8; 8192];
        b[0..2].copy_from_slice(&magic.to_le_bytes());
        b[2..4].copy_from_slice(&info.to_le_bytes());
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[8..16].copy_from_slice(&addr.to_le_bytes());
        b[24..32].copy_from_slice(&sysid.to_le_bytes());
        b[32..36].copy_from_slice(&size.to_le_bytes());
        b[36..40].copy_from_slice(&8192u32.to_le_bytes());
        b
    }

    #[test]
    fn every_maintained_version_and_no_other() {
        let seg = SegmentName {
            timeline: 1,
            log: 0,
            seg: 1,
        };
        let addr = seg.start_lsn(16 << 20);
        let parse = |magic| SegmentHeader::parse(&header_bytes(magic, 2, addr, 42, 16 << 20));
        for (magic, version) in [
            (0xD106, 13),
            (0xD10D, 14),
            (0xD110, 15),
            (0xD113, 16),
            (0xD116, 17),
            (0xD118, 18),
        ] {
            assert_eq!(parse(magic).unwrap().pg_version(), version);
        }
        // PostgreSQL 12 is no longer maintained; a newer one is named as such.
        let old = parse(0xD101).unwrap_err().to_string();
        assert!(old.contains("0xD101") && old.contains("13 to 18"), "{old}");
        assert!(!old.contains("newer"), "{old}");
        let newer = parse(0xD11A).unwrap_err().to_string();
        assert!(
            newer.contains("0xD11A") && newer.contains("newer than 18"),
            "{newer}"
        );
    }

    #[test]
    fn header_checks() {
        let seg = SegmentName {
            timeline: 1,
            log: 1,
            seg: 3,
        };
        let addr = seg.start_lsn(16 << 20);
        let h = SegmentHeader::parse(&header_bytes(0xD110, 2, addr, 42, 16 << 20)).unwrap();
        assert_eq!(h.pg_version(), 15);
        assert_eq!(h.system_identifier, 42);
        h.check_matches(seg).unwrap();
        assert!(h.check_matches(seg.next(16 << 20)).is_err());
        assert!(SegmentHeader::parse(&header_bytes(0x1234, 2, addr, 42, 16 << 20)).is_err());
        assert!(SegmentHeader::parse(&header_bytes(0xD110, 0, addr, 42, 16 << 20)).is_err());
        assert!(SegmentHeader::parse(&header_bytes(0xD110, 2, addr, 42, 3 << 20)).is_err());
        assert!(SegmentHeader::parse(&[0u8; 10]).is_err());
        // The last segment of the last log: no overflow, and a seg past the
        // end of a log is refused before any arithmetic.
        let last = SegmentName {
            timeline: 1,
            log: u32::MAX,
            seg: 0xFF,
        };
        let h = SegmentHeader::parse(&header_bytes(
            0xD110,
            2,
            last.start_lsn(16 << 20),
            42,
            16 << 20,
        ))
        .unwrap();
        h.check_matches(last).unwrap();
        assert!(
            h.check_matches(SegmentName {
                timeline: 1,
                log: u32::MAX,
                seg: 0xFFFF_FFFF
            })
            .is_err()
        );
    }

    proptest! {
        #[test]
        fn segment_names_round_trip(t in 1u32.., l: u32, s: u32) {
            let name = SegmentName { timeline: t, log: l, seg: s };
            let text = name.to_string();
            prop_assert_eq!(WalFileName::parse(&text).unwrap(), WalFileName::Segment(name));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = WalFileName::parse(&s);
        }

        #[test]
        fn parsed_names_print_back(s in "[0-9A-F]{8}([0-9A-F]{16})?(\\.partial|\\.history|\\.[0-9A-F]{8}\\.backup)?") {
            if let Ok(n) = WalFileName::parse(&s) {
                prop_assert_eq!(n.to_string(), s);
            }
        }

        #[test]
        fn header_parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = SegmentHeader::parse(&b);
        }

        #[test]
        fn containing_inverts_start(segno in 0u64..(1 << 40)) {
            let size = 16u32 << 20;
            let s = SegmentName::containing(1, segno * u64::from(size), size);
            prop_assert_eq!(s.segno(size), segno);
        }
    }
}
