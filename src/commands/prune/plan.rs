//! What a prune deletes, decided without touching the repository: which
//! backups the policy keeps, and which WAL those backups still need.

use crate::format::manifest::Manifest;
use crate::pg::wal::SegmentName;
use crate::repository::archive::WalArchive;
use crate::repository::lock::WalStart;
use crate::repository::retention::TimelineRetention;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::time::Duration;

// The doc comments are `walvault prune --help`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Policy {
    /// Keep the newest N backups.
    #[arg(long, env = "WALVAULT_KEEP_LAST")]
    pub keep_last: Option<usize>,
    /// Keep backups newer than this (e.g. 7d, 36h).
    #[arg(long, env = "WALVAULT_KEEP_WITHIN", value_parser = crate::human::parse_duration)]
    pub keep_within: Option<Duration>,
    /// Keep point-in-time recovery this far back; older kept backups keep only the WAL that makes them consistent.
    #[arg(long, env = "WALVAULT_KEEP_WAL_WITHIN", value_parser = crate::human::parse_duration)]
    pub keep_wal_within: Option<Duration>,
}

/// `now - d`, or the beginning of time when `d` reaches past it.
fn before(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// `keep[i]` for each backup (oldest first): kept by any policy, and the
/// newest always.
pub fn backups_to_keep(backups: &[Manifest], policy: &Policy, now: DateTime<Utc>) -> Vec<bool> {
    let n = backups.len();
    let by_backup_policy = policy.keep_last.is_some() || policy.keep_within.is_some();
    backups
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let newest = i + 1 == n;
            let by_count = policy.keep_last.is_some_and(|k| i + k >= n);
            // `before` saturates: a window reaching past the beginning of
            // time keeps everything instead of overflowing.
            let by_age = policy
                .keep_within
                .is_some_and(|d| b.stop_time >= before(now, d));
            newest || by_count || by_age || !by_backup_policy
        })
        .collect()
}

pub use crate::recovery::needs::WalNeed;

/// The WAL the kept backups need (see [`crate::recovery::needs::of_kept`]):
/// per timeline, all of it from its oldest kept backup on (or, with
/// `keep_wal_within`, from the backup that reaches the start of the window
/// on), and for each older kept backup of that timeline its own start to stop.
pub fn wal_needs(
    kept: &[&Manifest],
    policy: &Policy,
    now: DateTime<Utc>,
    segment_size: u32,
) -> Vec<WalNeed> {
    // The newest backup of a timeline that was consistent before the window
    // opened can reach every moment of the window on it; without one, all
    // its WAL is needed.
    let window_start = policy.keep_wal_within.map(|d| before(now, d));
    crate::recovery::needs::of_kept(kept, window_start, segment_size)
}

/// The WAL of backups in progress: each replays from its start on its own
/// timeline, and its stop is not known yet, so all of it from there on stays.
/// (Its packs are kept by its marker; without this its WAL would not be: a
/// first backup on a new timeline has no kept backup there to anchor it.)
pub fn in_progress_needs(running: &[WalStart], segment_size: u32) -> Vec<WalNeed> {
    running
        .iter()
        .map(|r| crate::recovery::needs::onwards(r.timeline, r.lsn, segment_size))
        .collect()
}

/// Where each timeline's WAL is complete from, for retention.json: the start
/// of the earliest open-ended need on it.
pub fn complete_from(needs: &[WalNeed]) -> Vec<TimelineRetention> {
    let mut from: BTreeMap<u32, u64> = BTreeMap::new();
    for n in needs.iter().filter(|n| n.to.is_none()) {
        from.entry(n.timeline)
            .and_modify(|f| *f = (*f).min(n.from))
            .or_insert(n.from);
    }
    from.into_iter()
        .map(|(timeline, complete_from_segno)| TimelineRetention {
            timeline,
            complete_from_segno,
        })
        .collect()
}

/// Whether a WAL file at (`timeline`, `segno`) is needed. A need on a
/// timeline also keeps the timelines branched from it (a restore to `latest`
/// may follow them) from the same segment on: along one lineage segment
/// numbers are comparable. A timeline whose parentage is unknown (no readable
/// history file) is kept when it is newer than a needed one: never delete
/// what we cannot reason about.
pub fn is_needed(archive: &WalArchive, needs: &[WalNeed], timeline: u32, segno: u64) -> bool {
    crate::recovery::needs::is_needed(&archive.ancestry, needs, timeline, segno)
}

/// For messages: the first segment a need starts at.
pub fn describe_need(n: &WalNeed, segment_size: u32) -> String {
    let first = SegmentName::of_segno(n.timeline, n.from, segment_size);
    match n.to {
        None => format!("{first} onwards"),
        Some(to) => format!(
            "{first} to {}",
            SegmentName::of_segno(n.timeline, to, segment_size)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::manifest::BackupStats;
    use crate::pg::lsn::Lsn;

    fn backup(id: &str, hours_ago: i64, start: u64, stop: u64, now: DateTime<Utc>) -> Manifest {
        Manifest {
            format: 1,
            id: id.into(),
            pg_version: 150000,
            system_identifier: "1".into(),
            wal_segment_size: 1 << 24,
            timeline: 1,
            start_lsn: Lsn(start << 24),
            // Inside segment `stop`, as most stops are.
            stop_lsn: Lsn((stop << 24) + 0x28),
            start_time: now - chrono::Duration::hours(hours_ago),
            stop_time: now - chrono::Duration::hours(hours_ago) + chrono::Duration::minutes(5),
            backup_label: String::new(),
            tablespace_map: None,
            tablespaces: vec![],
            directories: vec![],
            files: vec![],
            stats: BackupStats::default(),
        }
    }

    #[test]
    fn policies() {
        let now = Utc::now();
        let b = vec![
            backup("a", 72, 2, 3, now),
            backup("b", 48, 10, 11, now),
            backup("c", 24, 20, 21, now),
        ];
        let p = |l, w| Policy {
            keep_last: l,
            keep_within: w,
            keep_wal_within: None,
        };
        assert_eq!(
            backups_to_keep(&b, &p(Some(1), None), now),
            [false, false, true]
        );
        assert_eq!(
            backups_to_keep(&b, &p(Some(2), None), now),
            [false, true, true]
        );
        assert_eq!(
            backups_to_keep(&b, &p(None, Some(Duration::from_secs(50 * 3600))), now),
            [false, true, true]
        );
        // Nothing younger than an hour: the newest stays anyway.
        assert_eq!(
            backups_to_keep(&b, &p(None, Some(Duration::from_secs(3600))), now),
            [false, false, true]
        );
        assert_eq!(
            backups_to_keep(&b, &Policy::default(), now),
            [true, true, true]
        );
    }

    #[test]
    fn windows_past_the_beginning_of_time_keep_everything() {
        let now = Utc::now();
        let b = vec![backup("a", 72, 2, 3, now), backup("b", 48, 10, 11, now)];
        // `--keep-within 99999999d` / `--keep-wal-within 99999999d`, and beyond.
        for secs in [99_999_999 * 86_400, u64::MAX / 2, u64::MAX] {
            let d = Duration::from_secs(secs);
            let p = Policy {
                keep_within: Some(d),
                keep_wal_within: Some(d),
                ..Default::default()
            };
            assert_eq!(backups_to_keep(&b, &p, now), [true, true], "{secs}");
            let kept: Vec<&Manifest> = b.iter().collect();
            assert_eq!(wal_needs(&kept, &p, now, 1 << 24)[0].from, 2, "{secs}");
        }
    }

    #[test]
    fn wal_window() {
        let now = Utc::now();
        let b = [
            backup("a", 72, 2, 3, now),
            backup("b", 48, 10, 11, now),
            backup("c", 24, 20, 21, now),
        ];
        let kept: Vec<&Manifest> = b.iter().collect();
        let all = wal_needs(&kept, &Policy::default(), now, 1 << 24);
        assert_eq!(
            all,
            [WalNeed {
                timeline: 1,
                from: 2,
                to: None
            }]
        );
        let window = Policy {
            keep_wal_within: Some(Duration::from_secs(30 * 3600)),
            ..Default::default()
        };
        let needs = wal_needs(&kept, &window, now, 1 << 24);
        assert_eq!(
            needs,
            [
                WalNeed {
                    timeline: 1,
                    from: 10,
                    to: None
                },
                WalNeed {
                    timeline: 1,
                    from: 2,
                    to: Some(3)
                },
            ]
        );
        let archive = WalArchive::default();
        assert!(is_needed(&archive, &needs, 1, 3));
        assert!(!is_needed(&archive, &needs, 1, 4));
        assert!(!is_needed(&archive, &needs, 1, 9));
        assert!(is_needed(&archive, &needs, 1, 10));
        // Timeline 2 with no history file: kept, we cannot tell where it came from.
        assert!(is_needed(&archive, &needs, 2, 12));
    }

    #[test]
    fn a_stop_on_a_segment_boundary_needs_no_segment_after_it() {
        let now = Utc::now();
        let mut a = backup("a", 72, 2, 3, now);
        a.stop_lsn = Lsn(3 << 24);
        let b = [a, backup("b", 48, 10, 11, now)];
        let kept: Vec<&Manifest> = b.iter().collect();
        let window = Policy {
            keep_wal_within: Some(Duration::from_secs(30 * 3600)),
            ..Default::default()
        };
        let needs = wal_needs(&kept, &window, now, 1 << 24);
        assert_eq!(
            needs[1],
            WalNeed {
                timeline: 1,
                from: 2,
                to: Some(2)
            }
        );
    }

    fn on_timeline(mut m: Manifest, timeline: u32) -> Manifest {
        m.timeline = timeline;
        m
    }

    /// A PITR copy of `a` promoted to timeline 2 at segment 3, archived into
    /// the same repository and was backed up (`d`, after `c` in time but far
    /// behind it in LSN).
    fn two_timelines(now: DateTime<Utc>) -> (Vec<Manifest>, WalArchive) {
        let b = vec![
            backup("a", 72, 2, 3, now),
            backup("b", 48, 10, 11, now),
            backup("c", 24, 20, 21, now),
            on_timeline(backup("d", 12, 6, 7, now), 2),
        ];
        let mut archive = WalArchive::default();
        archive.ancestry.insert(2, vec![(1, 3 << 24)]);
        (b, archive)
    }

    #[test]
    fn each_timeline_keeps_what_its_backups_need() {
        let now = Utc::now();
        let (b, archive) = two_timelines(now);
        let keep = backups_to_keep(
            &b,
            &Policy {
                keep_last: Some(2),
                ..Default::default()
            },
            now,
        );
        assert_eq!(keep, [false, false, true, true]);
        let kept: Vec<&Manifest> = b.iter().zip(&keep).filter(|k| *k.1).map(|k| k.0).collect();
        let needs = wal_needs(&kept, &Policy::default(), now, 1 << 24);
        assert_eq!(
            needs,
            [
                WalNeed {
                    timeline: 1,
                    from: 20,
                    to: None
                },
                WalNeed {
                    timeline: 2,
                    from: 6,
                    to: None
                },
            ]
        );
        // Timeline 2 after its backup stays, though its LSNs are below the
        // newest timeline-1 backup's.
        for segno in [6, 7, 12, 25] {
            assert!(is_needed(&archive, &needs, 2, segno), "2/{segno}");
        }
        assert!(!is_needed(&archive, &needs, 2, 5));
        assert!(!is_needed(&archive, &needs, 1, 19));
        assert!(is_needed(&archive, &needs, 1, 20));
        assert_eq!(
            complete_from(&needs),
            [
                TimelineRetention {
                    timeline: 1,
                    complete_from_segno: 20
                },
                TimelineRetention {
                    timeline: 2,
                    complete_from_segno: 6
                },
            ]
        );
    }

    #[test]
    fn the_wal_of_a_backup_in_progress_on_a_new_timeline_is_kept() {
        let now = Utc::now();
        let (b, archive) = two_timelines(now);
        // Only the timeline-1 backups are kept; the PITR copy on timeline 2
        // is taking its first backup, started at segment 6.
        let kept: Vec<&Manifest> = b[1..3].iter().collect();
        let mut needs = wal_needs(&kept, &Policy::default(), now, 1 << 24);
        assert!(!is_needed(&archive, &needs, 2, 6), "the test needs a gap");
        needs.extend(in_progress_needs(
            &[WalStart {
                timeline: 2,
                lsn: Lsn((6 << 24) + 40),
            }],
            1 << 24,
        ));
        for segno in [6, 7, 9] {
            assert!(is_needed(&archive, &needs, 2, segno), "2/{segno}");
        }
        assert!(!is_needed(&archive, &needs, 2, 5));
        assert!(!is_needed(&archive, &needs, 1, 9));
        assert_eq!(
            complete_from(&needs),
            [
                TimelineRetention {
                    timeline: 1,
                    complete_from_segno: 10
                },
                TimelineRetention {
                    timeline: 2,
                    complete_from_segno: 6
                },
            ]
        );
    }

    #[test]
    fn the_wal_window_is_kept_per_timeline() {
        let now = Utc::now();
        let (b, archive) = two_timelines(now);
        let kept: Vec<&Manifest> = b[1..].iter().collect();
        let window = Policy {
            keep_wal_within: Some(Duration::from_secs(30 * 3600)),
            ..Default::default()
        };
        let needs = wal_needs(&kept, &window, now, 1 << 24);
        assert_eq!(
            needs,
            [
                WalNeed {
                    timeline: 1,
                    from: 10,
                    to: None
                },
                WalNeed {
                    timeline: 2,
                    from: 6,
                    to: None
                },
            ]
        );
        assert!(is_needed(&archive, &needs, 2, 8));
        assert!(!is_needed(&archive, &needs, 1, 9));
    }
}
