//! Continuity: where a timeline's WAL in the archive stops being contiguous,
//! and the stretches of WAL a backup's recovery reads, following the
//! timelines that branch from its own.

use super::{Ancestry, Listing, descends_from};
use crate::pg::lsn::Lsn;
use std::collections::BTreeMap;
use std::ops::RangeInclusive;

/// The first segment number from `from` on that the listing lacks: WAL is
/// contiguous from `from` to the segment before it (none when it is `from`).
pub fn first_missing<V>(segments: &BTreeMap<u64, V>, from: u64) -> u64 {
    let mut segno = from;
    while segments.contains_key(&segno) {
        segno += 1;
    }
    segno
}

/// Segment numbers missing between the first and last segment listed (from
/// `from` on, when given).
pub fn gaps<V>(segments: &BTreeMap<u64, V>, from: Option<u64>) -> Vec<u64> {
    let (Some(&first), Some(&last)) = (segments.keys().next(), segments.keys().next_back()) else {
        return vec![];
    };
    let start = from.unwrap_or(first);
    // Bounded: a damaged listing must not make us count to 2^64.
    (start..=last)
        .take(10_000_000)
        .filter(|n| !segments.contains_key(n))
        .collect()
}

/// What a listing holds of the segments `from..=to`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Walk {
    /// The segments listed, in order.
    pub present: Vec<u64>,
    /// Each run of segments missing, in order.
    pub missing: Vec<RangeInclusive<u64>>,
}

/// Walks what the listing holds of `from..=to`, never the numbers in
/// between: a manifest may claim any range, and the work must stay bounded
/// by the listing. `None`: the timeline has no segment listed. An empty
/// range (`from > to`) needs nothing.
pub fn walk<V>(segments: Option<&BTreeMap<u64, V>>, from: u64, to: u64) -> Walk {
    let mut walk = Walk::default();
    if from > to {
        return walk;
    }
    let mut expected = from;
    for &segno in segments
        .into_iter()
        .flat_map(|s| s.range(from..=to))
        .map(|(n, _)| n)
    {
        if segno > expected {
            walk.missing.push(expected..=segno - 1);
        }
        walk.present.push(segno);
        expected = segno + 1;
    }
    if expected <= to {
        walk.missing.push(expected..=to);
    }
    walk
}

/// Why a backup's recovery reads a stretch of WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// From its start to its stop: without it the backup never becomes
    /// consistent.
    Consistency,
    /// After that, to the end of the archive on its timeline or one that
    /// branches from it: recovery past the stop point replays it.
    RecoverPast,
}

/// A stretch of WAL a backup's recovery reads: segments `from..=to` on
/// `timeline`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stretch {
    pub timeline: u32,
    pub from: u64,
    pub to: u64,
    pub purpose: Purpose,
}

/// The WAL a backup on `timeline` from `start` to `stop` reads: its own
/// start to stop, then each timeline it is or that branches from it after
/// its start (a restore to `latest` follows them) up to that timeline's last
/// listed segment; LSNs of unrelated timelines are never compared.
/// `complete_from(timeline, segno)`: whether the archive keeps all WAL on
/// `timeline` from `segno` on (false where a prune trimmed it on purpose;
/// then only the consistency stretch is asked for).
pub fn stretches<V>(
    segments: &Listing<V>,
    ancestry: &BTreeMap<u32, Ancestry>,
    timeline: u32,
    (start, stop): (Lsn, Lsn),
    seg_size: u32,
    complete_from: &dyn Fn(u32, u64) -> bool,
) -> Vec<Stretch> {
    let span = start.segnos_until(stop, seg_size);
    let first = *span.start();
    let mut out = vec![Stretch {
        timeline,
        from: first,
        to: *span.end(),
        purpose: Purpose::Consistency,
    }];
    // WAL trimmed on purpose by `prune --keep-wal-within` is not a gap.
    if !complete_from(timeline, first) {
        return out;
    }
    for (&t, segs) in segments {
        let Some(switch) = descends_from(ancestry, t, timeline) else {
            continue;
        };
        // A timeline that left this one before the backup started is not
        // one its recovery can follow.
        if t != timeline && switch < start.0 {
            continue;
        }
        let from = if t == timeline {
            first
        } else {
            Lsn(switch).segno(seg_size).max(first)
        };
        let Some(&last) = segs.keys().next_back() else {
            continue;
        };
        out.push(Stretch {
            timeline: t,
            from,
            to: last,
            purpose: Purpose::RecoverPast,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery::testing::{SEG, listing};

    fn segs(present: &[u64]) -> BTreeMap<u64, ()> {
        present.iter().map(|&n| (n, ())).collect()
    }

    #[test]
    fn first_missing_and_gaps() {
        let s = segs(&[2, 3, 4, 7, 9]);
        assert_eq!(first_missing(&s, 2), 5);
        assert_eq!(first_missing(&s, 5), 5);
        assert_eq!(first_missing(&s, 9), 10);
        assert_eq!(gaps(&s, None), [5, 6, 8]);
        assert_eq!(gaps(&s, Some(0)), [0, 1, 5, 6, 8]);
        assert_eq!(gaps(&s, Some(8)), [8]);
        assert_eq!(gaps(&segs(&[]), None), Vec::<u64>::new());
    }

    #[test]
    fn walks_follow_the_listing() {
        let s = segs(&[2, 3, 6, 7]);
        assert_eq!(
            walk(Some(&s), 1, 9),
            Walk {
                present: vec![2, 3, 6, 7],
                missing: vec![1..=1, 4..=5, 8..=9]
            }
        );
        assert_eq!(
            walk(Some(&s), 2, 3),
            Walk {
                present: vec![2, 3],
                missing: vec![]
            }
        );
        assert_eq!(
            walk::<()>(None, 0, u64::MAX >> 24),
            Walk {
                present: vec![],
                missing: vec![0..=(u64::MAX >> 24)]
            }
        );
        // Nothing asked, nothing missing (and no panic).
        assert_eq!(walk(Some(&s), 7, 3), Walk::default());
    }

    #[test]
    fn a_backup_reads_on_across_a_timeline_switch() {
        // Timeline 2 left 1 in segment 6; timeline 3 left 1 in segment 2,
        // before the backup started; timeline 4 has no history file.
        let l = listing(&[
            (1, 4, ()),
            (1, 5, ()),
            (1, 6, ()),
            (1, 9, ()),
            (2, 6, ()),
            (2, 8, ()),
            (3, 3, ()),
            (4, 7, ()),
        ]);
        let ancestry: BTreeMap<u32, Ancestry> =
            [(2, vec![(1, (6 << 24) + 0x100)]), (3, vec![(1, 2 << 24)])].into();
        let all = |_: u32, _: u64| true;
        let got = stretches(
            &l,
            &ancestry,
            1,
            (Lsn((4 << 24) + 0x28), Lsn(5 << 24)),
            SEG,
            &all,
        );
        let s = |timeline, from, to, purpose| Stretch {
            timeline,
            from,
            to,
            purpose,
        };
        assert_eq!(
            got,
            [
                s(1, 4, 4, Purpose::Consistency),
                s(1, 4, 9, Purpose::RecoverPast),
                s(2, 6, 8, Purpose::RecoverPast),
            ]
        );
        // Where the archive was trimmed on purpose, only consistency.
        let trimmed = |t: u32, segno: u64| t != 1 || segno >= 6;
        let got = stretches(
            &l,
            &ancestry,
            1,
            (Lsn((4 << 24) + 0x28), Lsn(5 << 24)),
            SEG,
            &trimmed,
        );
        assert_eq!(got, [s(1, 4, 4, Purpose::Consistency)]);
        // A backup on timeline 2 reads its own timeline only.
        let got = stretches(
            &l,
            &ancestry,
            2,
            (Lsn(7 << 24), Lsn((7 << 24) + 0x100)),
            SEG,
            &all,
        );
        assert_eq!(
            got,
            [
                s(2, 7, 7, Purpose::Consistency),
                s(2, 7, 8, Purpose::RecoverPast)
            ]
        );
        // What a stretch finds in the listing: timeline 1 has a gap at 7..=8.
        assert_eq!(walk(l.get(&1), 4, 9).missing, [7..=8]);
    }
}
