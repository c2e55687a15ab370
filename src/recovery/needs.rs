//! The WAL backups need: one backup to become consistent, and the backups a
//! prune keeps to stay restorable (and reach the window it keeps).

use super::{Ancestry, descends_from};
use crate::format::manifest::Manifest;
use crate::pg::lsn::Lsn;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

/// A stretch of WAL that must stay: on `timeline` (and the timelines that
/// branch from it), segment numbers `from..=to` (`to: None`: to the end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalNeed {
    pub timeline: u32,
    pub from: u64,
    pub to: Option<u64>,
}

/// What a backup needs to become consistent: on its timeline, from the
/// segment holding its start to the one holding the byte before its stop
/// (a stop on a segment boundary needs nothing of the next segment).
pub fn to_consistency(b: &Manifest, seg_size: u32) -> WalNeed {
    let span = b.start_lsn.segnos_until(b.stop_lsn, seg_size);
    WalNeed {
        timeline: b.timeline,
        from: *span.start(),
        to: Some(*span.end()),
    }
}

/// All WAL on `timeline` from the segment holding `start` on.
pub fn onwards(timeline: u32, start: Lsn, seg_size: u32) -> WalNeed {
    WalNeed {
        timeline,
        from: start.segno(seg_size),
        to: None,
    }
}

/// The WAL the kept backups need (`kept`: oldest first), reasoned per
/// timeline: a backup replays its own timeline (and whatever branches from
/// it later), so LSNs are only ever compared between backups of one
/// timeline. On each timeline: all WAL from its oldest kept backup on (or,
/// with `window_start`, from the newest backup consistent by then, which
/// reaches every moment after it; without one, from the oldest), and for
/// each older kept backup of that timeline its own start to stop.
pub fn of_kept(
    kept: &[&Manifest],
    window_start: Option<DateTime<Utc>>,
    seg_size: u32,
) -> Vec<WalNeed> {
    let mut by_timeline: BTreeMap<u32, Vec<&Manifest>> = BTreeMap::new();
    for b in kept {
        by_timeline.entry(b.timeline).or_default().push(b);
    }
    let mut needs = vec![];
    for (&timeline, backups) in &by_timeline {
        // `kept` is oldest first, so each timeline's list is too.
        let oldest = backups[0];
        let anchor = match window_start {
            None => oldest,
            Some(window_start) => backups
                .iter()
                .rev()
                .find(|b| b.stop_time <= window_start)
                .copied()
                .unwrap_or(oldest),
        };
        needs.push(onwards(timeline, anchor.start_lsn, seg_size));
        for b in backups.iter().filter(|b| b.start_lsn < anchor.start_lsn) {
            needs.push(to_consistency(b, seg_size));
        }
    }
    needs
}

/// Whether a WAL file at (`timeline`, `segno`) is needed. A need on a
/// timeline also keeps the timelines branched from it (a restore to `latest`
/// may follow them) from the same segment on: along one lineage segment
/// numbers are comparable. A timeline whose parentage is unknown (no
/// readable history file in `ancestry`) is kept when it is newer than a
/// needed one: never delete what we cannot reason about.
pub fn is_needed(
    ancestry: &BTreeMap<u32, Ancestry>,
    needs: &[WalNeed],
    timeline: u32,
    segno: u64,
) -> bool {
    needs.iter().any(|n| {
        let related = timeline == n.timeline
            || descends_from(ancestry, timeline, n.timeline).is_some()
            || (timeline > n.timeline && !ancestry.contains_key(&timeline));
        related && segno >= n.from && n.to.is_none_or(|to| segno <= to)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery::testing::{SEG, backup};
    use chrono::Duration;

    fn need(timeline: u32, from: u64, to: Option<u64>) -> WalNeed {
        WalNeed { timeline, from, to }
    }

    #[test]
    fn a_backup_needs_its_start_to_its_stop() {
        let now = Utc::now();
        let b = backup("a", 1, (2 << 24) + 0x28, (4 << 24) + 0x28, now);
        assert_eq!(to_consistency(&b, SEG), need(1, 2, Some(4)));
        // A stop on a boundary needs nothing after it.
        let b = backup("a", 3, (2 << 24) + 0x28, 4 << 24, now);
        assert_eq!(to_consistency(&b, SEG), need(3, 2, Some(3)));
        // A stop before its start (a damaged manifest): the start's segment.
        let b = backup("a", 1, 5 << 24, 1, now);
        assert_eq!(to_consistency(&b, SEG), need(1, 5, Some(5)));
        assert_eq!(onwards(2, Lsn((7 << 24) + 1), SEG), need(2, 7, None));
    }

    #[test]
    fn kept_backups_on_two_timelines() {
        let now = Utc::now();
        let h = |n: i64| now - Duration::hours(n);
        let b = [
            backup("a", 1, 2 << 24, (3 << 24) + 0x28, h(72)),
            backup("b", 1, 10 << 24, (11 << 24) + 0x28, h(48)),
            backup("x", 2, 6 << 24, (7 << 24) + 0x28, h(40)),
            backup("c", 1, 20 << 24, (21 << 24) + 0x28, h(24)),
        ];
        let kept: Vec<&Manifest> = b.iter().collect();
        assert_eq!(
            of_kept(&kept, None, SEG),
            [need(1, 2, None), need(2, 6, None)]
        );
        // A window opening 30 hours ago: b reaches all of it on timeline 1,
        // a keeps its own WAL only; x was consistent before it too.
        assert_eq!(
            of_kept(&kept, Some(h(30)), SEG),
            [need(1, 10, None), need(1, 2, Some(3)), need(2, 6, None)]
        );
        // A window older than every backup: all WAL from the oldest.
        assert_eq!(
            of_kept(&kept, Some(h(100)), SEG),
            [need(1, 2, None), need(2, 6, None)]
        );
    }

    #[test]
    fn needed_along_a_lineage() {
        let needs = [need(1, 10, None), need(1, 2, Some(3))];
        let mut ancestry: BTreeMap<u32, Ancestry> = [(2, vec![(1, 12 << 24)])].into();
        assert!(is_needed(&ancestry, &needs, 1, 2));
        assert!(is_needed(&ancestry, &needs, 1, 3));
        assert!(!is_needed(&ancestry, &needs, 1, 4));
        assert!(is_needed(&ancestry, &needs, 1, 10));
        // Timeline 2 branched from 1: kept from the same segment on.
        assert!(is_needed(&ancestry, &needs, 2, 12));
        assert!(!is_needed(&ancestry, &needs, 2, 9));
        // Timeline 3, parentage unknown and newer: kept.
        assert!(is_needed(&ancestry, &needs, 3, 11));
        // Known to branch from elsewhere (timeline 3 of 5): not.
        ancestry.insert(3, vec![(5, 0)]);
        assert!(!is_needed(&ancestry, &needs, 3, 11));
    }
}
