//! Reading the records of a WAL segment, as far as status and drill need:
//! the commit and abort timestamps, which are what `recovery_target_time`
//! compares against. The layout is PostgreSQL's (xlogrecord.h,
//! xlog_internal.h, xact.h) on 64-bit little-endian platforms.

use crate::pg::wal::{LONG_PAGE_HEADER_SIZE, SegmentHeader};
use chrono::{DateTime, Utc};

const SHORT_PAGE_HEADER_SIZE: usize = 24;
const RECORD_HEADER_SIZE: usize = 24;
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const RM_XACT_ID: u8 = 1;
const XLOG_XACT_OPMASK: u8 = 0x70;
/// COMMIT, ABORT, COMMIT_PREPARED, ABORT_PREPARED: the records a time target stops at.
const XACT_TIMED_OPS: [u8; 4] = [0x00, 0x20, 0x30, 0x40];
const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;
/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

fn maxalign(n: usize) -> usize {
    (n + 7) & !7
}

/// A segment's record bytes with the page headers taken out, and the way
/// back from a position in them to an LSN.
struct Stream {
    bytes: Vec<u8>,
    segment_start: u64,
    page_size: usize,
}

impl Stream {
    fn new(segment: &[u8], header: &SegmentHeader) -> Option<Stream> {
        let page_size = header.block_size as usize;
        if !(1024..=65536).contains(&page_size) || segment.len() < page_size {
            return None;
        }
        let mut bytes = Vec::with_capacity(segment.len());
        for (i, page) in segment.chunks(page_size).enumerate() {
            let skip = if i == 0 {
                LONG_PAGE_HEADER_SIZE
            } else {
                SHORT_PAGE_HEADER_SIZE
            };
            if page.len() < skip {
                break;
            }
            bytes.extend_from_slice(&page[skip..]);
        }
        Some(Stream {
            bytes,
            segment_start: header.page_address,
            page_size,
        })
    }

    /// The LSN of a position in the stream.
    fn lsn(&self, pos: usize) -> u64 {
        let first = self.page_size - LONG_PAGE_HEADER_SIZE;
        let offset = if pos < first {
            LONG_PAGE_HEADER_SIZE + pos
        } else {
            let rest = pos - first;
            let per_page = self.page_size - SHORT_PAGE_HEADER_SIZE;
            self.page_size * (1 + rest / per_page) + SHORT_PAGE_HEADER_SIZE + rest % per_page
        };
        self.segment_start + offset as u64
    }

    fn u8_at(&self, pos: usize) -> Option<u8> {
        self.bytes.get(pos).copied()
    }
    fn u32_at(&self, pos: usize) -> Option<u32> {
        Some(u32::from_le_bytes(
            self.bytes.get(pos..pos + 4)?.try_into().ok()?,
        ))
    }
    fn u64_at(&self, pos: usize) -> Option<u64> {
        Some(u64::from_le_bytes(
            self.bytes.get(pos..pos + 8)?.try_into().ok()?,
        ))
    }
}

/// The timestamp a transaction record carries: `xl_xact_commit.xact_time`
/// (and likewise for abort), the first field of the main data. Transaction
/// records carry no block references, only data headers.
fn xact_time(s: &Stream, record: usize, total_len: usize) -> Option<i64> {
    let end = record + total_len;
    let mut pos = record + RECORD_HEADER_SIZE;
    let main_len = loop {
        match s.u8_at(pos)? {
            XLR_BLOCK_ID_DATA_SHORT => break usize::from(s.u8_at(pos + 1)?),
            XLR_BLOCK_ID_DATA_LONG => {
                let len = s.u32_at(pos + 1)? as usize;
                pos += 3;
                break len;
            }
            XLR_BLOCK_ID_ORIGIN => pos += 3,
            XLR_BLOCK_ID_TOPLEVEL_XID => pos += 5,
            _ => return None,
        }
    };
    let data = pos + 2;
    if main_len < 8 || data + main_len > end {
        return None;
    }
    Some(s.u64_at(data)? as i64)
}

/// Commit and abort times of every transaction record in the segment, in
/// WAL order. Stops at the end of valid WAL (zeros after a switch, or a
/// record whose back-link does not match: never a guessed timestamp).
pub fn transaction_times(segment: &[u8]) -> Vec<DateTime<Utc>> {
    let Ok(header) = SegmentHeader::parse(segment) else {
        return vec![];
    };
    let Some(s) = Stream::new(segment, &header) else {
        return vec![];
    };
    let info = u16::from_le_bytes([segment[2], segment[3]]);
    let mut pos = 0;
    if info & XLP_FIRST_IS_CONTRECORD != 0 {
        let remaining = u32::from_le_bytes(segment[16..20].try_into().unwrap()) as usize;
        pos = maxalign(remaining);
    }
    let mut prev_lsn: Option<u64> = None;
    let mut times = vec![];
    while pos + RECORD_HEADER_SIZE <= s.bytes.len() {
        let Some(total) = s.u32_at(pos).map(|t| t as usize) else {
            break;
        };
        if total < RECORD_HEADER_SIZE || pos + total > s.bytes.len() {
            break;
        }
        let xl_prev = s.u64_at(pos + 8).unwrap_or(0);
        if prev_lsn.is_some_and(|p| p != xl_prev) {
            break;
        }
        let xl_info = s.u8_at(pos + 16).unwrap_or(0);
        let rmid = s.u8_at(pos + 17).unwrap_or(0);
        if rmid == RM_XACT_ID
            && XACT_TIMED_OPS.contains(&(xl_info & XLOG_XACT_OPMASK))
            && let Some(us) = xact_time(&s, pos, total)
            && let Some(t) =
                DateTime::<Utc>::from_timestamp_micros(us.saturating_add(PG_EPOCH_OFFSET_US))
        {
            times.push(t);
        }
        prev_lsn = Some(s.lsn(pos));
        pos = maxalign(pos + total);
    }
    times
}

/// The last commit or abort time in the segment.
pub fn last_transaction_time(segment: &[u8]) -> Option<DateTime<Utc>> {
    transaction_times(segment).into_iter().max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_never_panics() {
        assert!(transaction_times(&[]).is_empty());
        assert!(transaction_times(&[0u8; 100]).is_empty());
        let mut seg = vec![0u8; 1 << 20];
        seg[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        seg[2..4].copy_from_slice(&3u16.to_le_bytes());
        seg[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        seg[32..36].copy_from_slice(&(1u32 << 20).to_le_bytes());
        seg[36..40].copy_from_slice(&8192u32.to_le_bytes());
        assert!(transaction_times(&seg).is_empty());
    }

    #[test]
    fn stream_lsns() {
        let header = SegmentHeader {
            magic: 0xD110,
            timeline: 1,
            page_address: 0x100_0000,
            system_identifier: 1,
            segment_size: 1 << 20,
            block_size: 8192,
        };
        let s = Stream::new(&vec![0u8; 1 << 20], &header).unwrap();
        assert_eq!(s.lsn(0), 0x100_0000 + 40);
        assert_eq!(s.lsn(8192 - 40), 0x100_0000 + 8192 + 24);
        assert_eq!(s.lsn(8192 - 40 + 8192 - 24), 0x100_0000 + 2 * 8192 + 24);
    }
}
