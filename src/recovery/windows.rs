//! Recoverable windows: the spans of time a point-in-time restore can reach,
//! per timeline.

use super::Listing;
use super::continuity::first_missing;
use crate::format::manifest::Manifest;
use chrono::{DateTime, Utc};
use serde::Serialize;

/// A span of time a point-in-time restore can reach.
#[derive(Serialize, Clone, Debug)]
pub struct Window {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub timeline: u32,
    pub from_backup: String,
    /// Whether `to` is the last commit read from the WAL (exact) or, when no
    /// commit could be found, the time the last segment was archived.
    pub to_is_last_commit: bool,
    /// The last segment (on `timeline`) the window's WAL reaches.
    #[serde(skip)]
    pub end_segno: u64,
}

/// Each backup can reach from its consistency point (`stop_time`) to the
/// archive time of the last segment it can replay without a gap on its own
/// timeline; overlapping spans of one timeline are merged. The end is when
/// that segment was archived (`archived_at`), a moment at or after its last
/// commit. A backup whose WAL to its stop is not all there has no window.
pub fn recoverable<V>(
    segments: &Listing<V>,
    backups: &[Manifest],
    seg_size: u32,
    archived_at: impl Fn(&V) -> DateTime<Utc>,
) -> Vec<Window> {
    let mut windows: Vec<Window> = vec![];
    for b in backups {
        let Some(segs) = segments.get(&b.timeline) else {
            continue;
        };
        // The last segment a backup needs holds the byte before its stop LSN.
        let needs = b.start_lsn.segnos_until(b.stop_lsn, seg_size);
        let end = first_missing(segs, *needs.start());
        if end == *needs.start() {
            continue; // not even its first segment
        }
        if end <= *needs.end() {
            continue; // never consistent: not a window
        }
        let last = &segs[&(end - 1)];
        windows.push(Window {
            from: b.stop_time,
            to: archived_at(last).max(b.stop_time),
            timeline: b.timeline,
            from_backup: b.id.clone(),
            to_is_last_commit: false,
            end_segno: end - 1,
        });
    }
    windows.sort_by_key(|w| w.from);
    let mut merged: Vec<Window> = vec![];
    for w in windows {
        match merged.last_mut() {
            Some(m) if w.timeline == m.timeline && w.from <= m.to => {
                if w.end_segno > m.end_segno {
                    m.to = w.to;
                    m.end_segno = w.end_segno;
                }
            }
            _ => merged.push(w),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery::testing::{SEG, backup, listing};
    use chrono::Duration;

    fn summary(w: &[Window]) -> Vec<(u32, &str, u64, i64, i64)> {
        let t0 = epoch();
        w.iter()
            .map(|w| {
                (
                    w.timeline,
                    w.from_backup.as_str(),
                    w.end_segno,
                    (w.from - t0).num_minutes(),
                    (w.to - t0).num_minutes(),
                )
            })
            .collect()
    }

    fn epoch() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-27T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn at(minutes: i64) -> DateTime<Utc> {
        epoch() + Duration::minutes(minutes)
    }

    #[test]
    fn windows_per_timeline_with_gaps() {
        // Each segment `n` was archived at minute 10 * n.
        let mut segs = vec![];
        for n in [2, 3, 4, 5, 7, 8, 9] {
            segs.push((1, n, at(10 * n as i64)));
        }
        for n in [6, 7, 8] {
            segs.push((2, n, at(10 * n as i64 + 1)));
        }
        let l = listing(&segs);
        let backups = [
            // Start to end of the run 2..=5.
            backup("a", 1, (2 << 24) + 0x28, (3 << 24) + 0x28, at(31)),
            // Inside the same run: merged into a's window.
            backup("b", 1, (3 << 24) + 0x28, (4 << 24) + 0x28, at(41)),
            // Stops in the missing segment 6: never consistent.
            backup("c", 1, (5 << 24) + 0x28, (6 << 24) + 0x28, at(61)),
            // After the gap: its own window to segment 9.
            backup("d", 1, (7 << 24) + 0x28, (7 << 24) + 0x100, at(71)),
            // Timeline 2: its own window, though it overlaps in time.
            backup("e", 2, (6 << 24) + 0x28, (7 << 24) + 0x28, at(72)),
            // A timeline with no WAL at all.
            backup("f", 3, (6 << 24) + 0x28, (7 << 24) + 0x28, at(73)),
        ];
        let w = recoverable(&l, &backups, SEG, |t| *t);
        assert_eq!(
            summary(&w),
            [
                (1, "a", 5, 31, 50),
                (1, "d", 9, 71, 90),
                (2, "e", 8, 72, 81),
            ]
        );
    }

    #[test]
    fn a_window_ends_no_earlier_than_it_starts() {
        let l = listing(&[(1, 2, at(0))]);
        let w = recoverable(
            &l,
            &[backup("a", 1, 2 << 24, (2 << 24) + 1, at(5))],
            SEG,
            |t| *t,
        );
        assert_eq!(summary(&w), [(1, "a", 2, 5, 5)]);
    }

    #[test]
    fn a_later_backup_extends_a_merged_window_only_forward() {
        let l = listing(&[(1, 2, at(20)), (1, 3, at(30)), (1, 5, at(50))]);
        let backups = [
            backup("a", 1, 2 << 24, (2 << 24) + 1, at(21)),
            // Consistent inside a's window, its WAL (5) beyond a gap: the
            // times overlap, so the windows merge and b's end is the end.
            backup("b", 1, 5 << 24, (5 << 24) + 1, at(25)),
        ];
        let w = recoverable(&l, &backups, SEG, |t| *t);
        assert_eq!(summary(&w), [(1, "a", 5, 21, 50)]);
        // b's window lies inside a's: merged, a's end stays.
        let backups = [
            backup("a", 1, 2 << 24, (2 << 24) + 1, at(21)),
            backup("b", 1, 3 << 24, (3 << 24) + 1, at(25)),
        ];
        let l = listing(&[(1, 2, at(20)), (1, 3, at(30)), (1, 4, at(40))]);
        let w = recoverable(&l, &backups, SEG, |t| *t);
        assert_eq!(summary(&w), [(1, "a", 4, 21, 40)]);
    }
}
