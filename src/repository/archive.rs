//! The WAL archive as a whole: which segments each timeline holds, where the
//! gaps are, and how timelines branch (from `.history` files). Shared by
//! prune, status, verify and drill.

use crate::error::Result;
use crate::format::key::{WAL_DIR, wal_key, wal_name_of_key};
use crate::format::object;
use crate::pg::wal::{SegmentName, WalFileName};
use crate::repository::Repository;
use std::collections::BTreeMap;

/// One archived file and what the store knows of it.
#[derive(Debug, Clone)]
pub struct ArchivedFile {
    pub name: WalFileName,
    pub meta: crate::repository::ObjectInfo,
}

/// A timeline's parentage: `(parent timeline, LSN where this one branched off)`,
/// nearest parent first, as PostgreSQL's history file lists them reversed.
pub type Ancestry = crate::recovery::Ancestry;

#[derive(Debug, Default)]
pub struct WalArchive {
    pub segment_size: u32,
    /// timeline → segment number → file.
    pub segments: BTreeMap<u32, BTreeMap<u64, ArchivedFile>>,
    pub histories: BTreeMap<u32, ArchivedFile>,
    /// `.partial` and `.backup` files, by timeline and segment number.
    pub others: Vec<(u64, ArchivedFile)>,
    /// Parsed history files: timeline → its ancestors.
    pub ancestry: BTreeMap<u32, Ancestry>,
}

impl WalArchive {
    /// Lists `wal/` and reads every history file (they are tiny).
    pub async fn load(repo: &Repository, segment_size: u32) -> Result<WalArchive> {
        let mut archive = WalArchive {
            segment_size,
            ..Default::default()
        };
        for meta in repo.list(WAL_DIR).await? {
            let Some(name) = wal_name_of_key(&meta.key) else {
                continue;
            };
            let file = ArchivedFile { name, meta };
            match name {
                WalFileName::Segment(s) => {
                    archive
                        .segments
                        .entry(s.timeline)
                        .or_default()
                        .insert(s.segno(segment_size), file);
                }
                WalFileName::TimelineHistory(t) => {
                    archive.histories.insert(t, file);
                }
                WalFileName::Partial(s) | WalFileName::BackupHistory(s, _) => {
                    archive.others.push((s.segno(segment_size), file));
                }
            }
        }
        for t in archive.histories.keys().copied().collect::<Vec<_>>() {
            if let Some(bytes) = repo.get(&wal_key(&WalFileName::TimelineHistory(t))).await? {
                // A damaged history file is verify's to report; here it only
                // means we cannot tell that timeline's parents.
                if let Ok((_, text)) = object::decode_limited(&bytes, 16 << 20) {
                    archive
                        .ancestry
                        .insert(t, parse_history(&String::from_utf8_lossy(&text)));
                }
            }
        }
        Ok(archive)
    }

    /// Whether `timeline` is `ancestor` or branched from it (directly or not),
    /// and if so the LSN from which `timeline`'s WAL continues `ancestor`'s.
    pub fn descends_from(&self, timeline: u32, ancestor: u32) -> Option<u64> {
        crate::recovery::descends_from(&self.ancestry, timeline, ancestor)
    }

    pub fn segment_name(&self, timeline: u32, segno: u64) -> SegmentName {
        SegmentName::of_segno(timeline, segno, self.segment_size)
    }

    /// Segment numbers missing between the first and last segment of each
    /// timeline (from `from` on, when given).
    pub fn gaps(&self, timeline: u32, from: Option<u64>) -> Vec<u64> {
        self.segments.get(&timeline).map_or_else(Vec::new, |segs| {
            crate::recovery::continuity::gaps(segs, from)
        })
    }

    /// The newest segment in the archive (any timeline), by archive time.
    pub fn newest(&self) -> Option<&ArchivedFile> {
        self.segments
            .values()
            .flat_map(|m| m.values())
            .max_by_key(|f| f.meta.last_modified)
    }

    pub fn all_files(&self) -> impl Iterator<Item = &ArchivedFile> {
        self.segments
            .values()
            .flat_map(|m| m.values())
            .chain(self.histories.values())
            .chain(self.others.iter().map(|(_, f)| f))
    }
}

/// A timeline history file: `parentTLI<TAB>switchpoint<TAB>reason` lines.
pub fn parse_history(text: &str) -> Ancestry {
    let mut out: Ancestry = text
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let mut fields = line.split_whitespace();
            let tli = fields.next()?.parse().ok()?;
            let lsn = crate::pg::lsn::parse_lsn(fields.next()?)?;
            Some((tli, lsn))
        })
        .collect();
    out.reverse();
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn history() {
        let h = "1\t0/3000000\tno recovery target specified\n\n2\t0/5000A0\tbefore 2026-11-27\n";
        assert_eq!(super::parse_history(h), vec![(2, 0x5000A0), (1, 0x3000000)]);
    }

    #[tokio::test]
    async fn loads_segments_histories_and_gaps_from_a_repository_in_memory() {
        use crate::format::key::wal_key;
        use crate::pg::wal::{SegmentName, WalFileName};
        use crate::repository::Repository;
        use bytes::Bytes;
        const SEG: u32 = 1 << 24;
        let repo = Repository::in_memory();
        let seg = |t, n| SegmentName::of_segno(t, n, SEG);
        let mut names = vec![];
        // Timeline 1: 1 to 8 but 5; timeline 2 from 3 on, and 256 on in
        // the next log (another folder of wal/).
        for n in (1..=8).filter(|n| *n != 5) {
            names.push(WalFileName::Segment(seg(1, n)));
        }
        for n in [3, 4, 256, 257] {
            names.push(WalFileName::Segment(seg(2, n)));
        }
        names.push(WalFileName::Partial(seg(1, 3)));
        names.push(WalFileName::BackupHistory(seg(1, 2), 0x28));
        for name in &names {
            repo.put_new(&wal_key(name), Bytes::from_static(b"wal"))
                .await
                .unwrap();
        }
        let (_, history) =
            crate::format::object::encode(b"1\t0/3000000\tno recovery target specified\n", 3)
                .unwrap();
        repo.put_new(
            &wal_key(&WalFileName::TimelineHistory(2)),
            Bytes::from(history),
        )
        .await
        .unwrap();
        // Not WAL: passed over.
        repo.put_new(&"wal/README".into(), Bytes::from_static(b"x"))
            .await
            .unwrap();

        let archive = super::WalArchive::load(&repo, SEG).await.unwrap();
        let on = |t: u32| -> Vec<u64> { archive.segments[&t].keys().copied().collect() };
        assert_eq!(on(1), [1, 2, 3, 4, 6, 7, 8]);
        assert_eq!(on(2), [3, 4, 256, 257]);
        assert_eq!(archive.others.len(), 2);
        assert_eq!(archive.histories.keys().collect::<Vec<_>>(), [&2]);
        assert_eq!(archive.ancestry[&2], vec![(1, 0x300_0000)]);
        assert_eq!(archive.gaps(1, None), [5]);
        assert_eq!(archive.gaps(1, Some(6)), Vec::<u64>::new());
        assert_eq!(archive.gaps(2, None), (5..256).collect::<Vec<_>>());
        assert_eq!(archive.descends_from(2, 1), Some(0x300_0000));
        assert_eq!(archive.descends_from(1, 2), None);
        assert_eq!(archive.all_files().count(), names.len() + 1);
    }
}
