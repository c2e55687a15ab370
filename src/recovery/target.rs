//! Recovery targets and the backup that can reach one.

use super::Ancestry;
use crate::error::{Error, Result};
use crate::format::manifest::Manifest;
use crate::pg::lsn::Lsn;
use chrono::{DateTime, FixedOffset, Utc};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// Replay to the end of the archive.
    Latest,
    Time(DateTime<FixedOffset>),
    Lsn(Lsn),
    Xid(String),
    Name(String),
    /// Stop as soon as the backup is consistent.
    Immediate,
}

impl RecoveryTarget {
    /// Whether replay from `b` can stop at this target: only after `b` is
    /// consistent. Xid, name, latest and immediate targets cannot be placed
    /// before a backup, so every backup reaches them as far as we can tell.
    pub fn reachable_from(&self, b: &Manifest) -> bool {
        match self {
            RecoveryTarget::Time(t) => b.stop_time <= t.with_timezone(&Utc),
            RecoveryTarget::Lsn(l) => b.stop_lsn <= *l,
            _ => true,
        }
    }
}

/// The backup chosen, and a note for the log on why, when it is not the
/// obvious one.
#[derive(Debug)]
pub struct Choice<'a> {
    pub backup: &'a Manifest,
    pub note: Option<String>,
}

/// Picks the backup (`backups`: oldest first) to reach `target`: the one
/// `named`, or the newest one that was consistent before the target (only
/// then can replay stop there). `complete_from(timeline, segno)`: whether
/// the archive holds all WAL on `timeline` from `segno` on (false where a
/// prune trimmed it); xid and name targets cannot be placed in time, so they
/// start from the oldest backup whose WAL is complete, which reaches any of
/// them that lies after it.
pub fn choose<'a>(
    target: &RecoveryTarget,
    backups: &'a [Manifest],
    named: Option<&str>,
    complete_from: &dyn Fn(u32, u64) -> bool,
) -> Result<Choice<'a>> {
    let chosen = |backup| Choice { backup, note: None };
    if backups.is_empty() {
        return Err(Error::not_found(
            "the repository holds no backup; run 'walvault backup' first",
        ));
    }
    if let Some(id) = named.filter(|id| *id != "latest") {
        let b = backups.iter().find(|b| b.id == id).ok_or_else(|| {
            Error::not_found(format!("no backup {id}; 'walvault list' shows the backups"))
        })?;
        if !target.reachable_from(b) {
            return Err(Error::usage(format!(
                "backup {id} became consistent at {} (LSN {}), after the target; pick an older backup or leave out --backup",
                b.stop_time.format("%Y-%m-%d %H:%M:%S%.6f+00"),
                b.stop_lsn
            )));
        }
        return Ok(chosen(b));
    }
    if matches!(target, RecoveryTarget::Xid(_) | RecoveryTarget::Name(_)) {
        let size = backups[0].wal_segment_size;
        let complete = |b: &&Manifest| complete_from(b.timeline, b.start_lsn.segno(size));
        if let Some(b) = backups.iter().find(complete) {
            let note = (backups.len() > 1).then(|| {
                format!(
                    "starting from backup {}, the oldest with complete WAL after it; give --backup to start from a newer one",
                    b.id
                )
            });
            return Ok(Choice { backup: b, note });
        }
    }
    backups
        .iter()
        .rev()
        .find(|b| target.reachable_from(b))
        .map(chosen)
        .ok_or_else(|| {
            let oldest = &backups[0];
            match target {
                RecoveryTarget::Lsn(l) => Error::usage(format!(
                    "LSN {l} is before every backup; the earliest reachable LSN is {} (backup {})",
                    oldest.stop_lsn, oldest.id
                )),
                _ => Error::usage(format!(
                    "target time is before every backup; the earliest reachable time is {} (backup {})",
                    oldest.stop_time.format("%Y-%m-%d %H:%M:%S%.6f+00"),
                    oldest.id
                )),
            }
        })
}

/// The backups recovery can start from to follow timeline `n`: those on `n`
/// itself, and those on an ancestor that were consistent before `n`'s
/// history (`ancestry`) left that ancestor.
pub fn on_lineage(backups: &[Manifest], n: u32, ancestry: &Ancestry) -> Vec<Manifest> {
    backups
        .iter()
        .filter(|b| {
            b.timeline == n
                || ancestry
                    .iter()
                    .any(|(parent, left_at)| *parent == b.timeline && b.stop_lsn.0 <= *left_at)
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery::testing::backup;
    use chrono::Duration;

    fn hour(h: i64) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-27T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
            + Duration::hours(h)
    }

    fn three() -> Vec<Manifest> {
        vec![
            backup("a", 1, 2 << 24, (3 << 24) + 0x28, hour(1)),
            backup("b", 1, 10 << 24, (11 << 24) + 0x28, hour(2)),
            backup("c", 1, 20 << 24, (21 << 24) + 0x28, hour(3)),
        ]
    }

    fn pick(
        target: &RecoveryTarget,
        backups: &[Manifest],
        named: Option<&str>,
        complete_from: &dyn Fn(u32, u64) -> bool,
    ) -> std::result::Result<String, String> {
        choose(target, backups, named, complete_from)
            .map(|c| c.backup.id.clone())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_newest_backup_consistent_before_the_target() {
        let b = three();
        let all = |_: u32, _: u64| true;
        let at = |h: i64| RecoveryTarget::Time(hour(h).fixed_offset());
        assert_eq!(pick(&RecoveryTarget::Latest, &b, None, &all).unwrap(), "c");
        assert_eq!(
            pick(&RecoveryTarget::Immediate, &b, None, &all).unwrap(),
            "c"
        );
        assert_eq!(pick(&at(2), &b, None, &all).unwrap(), "b");
        assert_eq!(pick(&at(5), &b, None, &all).unwrap(), "c");
        let lsn = RecoveryTarget::Lsn(Lsn(15 << 24));
        assert_eq!(pick(&lsn, &b, None, &all).unwrap(), "b");
        // "latest" as a backup name means no backup named.
        assert_eq!(pick(&lsn, &b, Some("latest"), &all).unwrap(), "b");
        let e = pick(&at(0), &b, None, &all).unwrap_err();
        assert!(e.contains("target time is before every backup"), "{e}");
        let e = pick(&RecoveryTarget::Lsn(Lsn(1)), &b, None, &all).unwrap_err();
        assert!(e.contains("LSN 0/1 is before every backup"), "{e}");
        let e = pick(&RecoveryTarget::Latest, &[], None, &all).unwrap_err();
        assert!(e.contains("holds no backup"), "{e}");
    }

    #[test]
    fn a_named_backup_must_be_consistent_before_the_target() {
        let b = three();
        let all = |_: u32, _: u64| true;
        let at = |h: i64| RecoveryTarget::Time(hour(h).fixed_offset());
        assert_eq!(pick(&at(2), &b, Some("a"), &all).unwrap(), "a");
        let e = pick(&at(2), &b, Some("c"), &all).unwrap_err();
        assert!(e.contains("backup c became consistent at"), "{e}");
        let e = pick(&at(2), &b, Some("z"), &all).unwrap_err();
        assert!(e.contains("no backup z"), "{e}");
        // Xid targets cannot be placed: any named backup will do.
        let xid = RecoveryTarget::Xid("1234".into());
        assert_eq!(pick(&xid, &b, Some("c"), &all).unwrap(), "c");
    }

    #[test]
    fn xid_and_name_targets_start_from_the_oldest_complete_backup() {
        let b = three();
        let xid = RecoveryTarget::Xid("1234".into());
        let name = RecoveryTarget::Name("before-upgrade".into());
        let all = |_: u32, _: u64| true;
        let c = choose(&xid, &b, None, &all).unwrap();
        assert_eq!(c.backup.id, "a");
        assert!(c.note.unwrap().contains("the oldest with complete WAL"));
        // A prune kept complete WAL from segment 10 on only.
        let from_10 = |_: u32, segno: u64| segno >= 10;
        assert_eq!(pick(&name, &b, None, &from_10).unwrap(), "b");
        // None complete: the newest.
        let none = |_: u32, _: u64| false;
        assert_eq!(pick(&xid, &b, None, &none).unwrap(), "c");
        // One backup: no note.
        assert!(choose(&xid, &b[..1], None, &all).unwrap().note.is_none());
    }

    #[test]
    fn backups_on_a_timelines_lineage() {
        let t = hour(1);
        // Timeline 3 left 2 at 0x500, which had left 1 at 0x300.
        let ancestry = vec![(2, 0x500), (1, 0x300)];
        let all = vec![
            backup("1a", 1, 0x100, 0x200, t), // before the branch: on the lineage
            backup("1b", 1, 0x380, 0x400, t), // timeline 1 after 2 left it: not
            backup("2a", 2, 0x400, 0x480, t), // timeline 2 before 3 left it
            backup("2b", 2, 0x600, 0x700, t), // timeline 2 after: not
            backup("3a", 3, 0x800, 0x900, t),
            backup("4a", 4, 0x800, 0x900, t), // another branch: not
        ];
        let ids: Vec<String> = on_lineage(&all, 3, &ancestry)
            .into_iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(ids, ["1a", "2a", "3a"]);
        // Then the target is chosen among those.
        let lineage = on_lineage(&all, 3, &ancestry);
        let lsn = RecoveryTarget::Lsn(Lsn(0x500));
        assert_eq!(pick(&lsn, &lineage, None, &|_, _| true).unwrap(), "2a");
    }
}
