//! Telling the end of the archive from a gap in it: a missing segment with
//! later WAL stored after it (on its timeline or a newer one) must stop
//! recovery instead of ending it.

use crate::error::{Error, Result};
use crate::format::key::wal_key;
use crate::format::object::{self};
use crate::pg::wal::{SegmentName, WalFileName};
use crate::repository::Repository;
use std::path::Path;
use std::time::{Duration, Instant};

/// What the archive says about a segment fetch did not find.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Gap {
    /// Nothing of its timeline after it (the end of the archive), or nothing
    /// before it (the timeline starts later).
    None,
    /// It arrived while we waited.
    Settled,
    /// Missing while WAL of its timeline went on after it.
    Before(Later),
}

/// What proves that WAL of a missing segment's timeline went on after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Later {
    /// The next stored segment of the same timeline.
    Segment(SegmentName),
    /// The timeline's last, partial segment (archived at a promotion).
    Partial(SegmentName),
    /// Timeline `child`'s history says it left the missing segment's
    /// timeline at `at`, past the missing segment: its WAL up to `at` is
    /// part of `child`'s history.
    Branch { child: u32, at: u64 },
}

impl Later {
    fn describe(&self) -> String {
        match self {
            Later::Segment(s) => format!("{s} after it is"),
            Later::Partial(s) => format!("{s}.partial after it is"),
            Later::Branch { child, at } => format!(
                "{child:08X}.history says timeline {child} branched from it later, at {}",
                crate::pg::lsn::format_lsn(*at)
            ),
        }
    }
}

/// Most timelines above the missing segment's whose history files are read.
pub(super) const MAX_CHILD_TIMELINES: u32 = 1000;

/// Whether `missing` is a hole in its timeline's WAL: missing while WAL of
/// its timeline went on after it (a later stored segment, a later
/// `.partial`, or a newer timeline's history saying it branched off past
/// it), with WAL of the timeline before it (a stored segment, or its own
/// history saying it began earlier). Segments are listed from its log
/// folder, and from the next (or previous) folder only when no later (or
/// earlier) one is in it. Nothing earlier means the timeline starts later,
/// which recovery asks about too. A hole next to segments stored just now is
/// given `settle` to fill.
pub(super) async fn gap_at(
    repo: &Repository,
    missing: SegmentName,
    settle: Duration,
) -> Result<Gap> {
    let stored = |log: u32| {
        let prefix = format!(
            "{}/{:08X}{log:08X}",
            crate::format::key::WAL_DIR,
            missing.timeline
        );
        async move {
            let listed = repo.list(&prefix).await?;
            Ok::<_, Error>(
                listed
                    .into_iter()
                    .filter_map(
                        |meta| match crate::format::key::wal_name_of_key(&meta.key) {
                            Some(n @ (WalFileName::Segment(s) | WalFileName::Partial(s)))
                                if s.timeline == missing.timeline =>
                            {
                                Some((n, s, meta.last_modified))
                            }
                            _ => None,
                        },
                    )
                    .collect::<Vec<_>>(),
            )
        }
    };
    let mut here = stored(missing.log).await?;
    if !here.iter().any(|(_, s, _)| *s > missing) && missing.log < u32::MAX {
        here.extend(stored(missing.log + 1).await?);
    }
    let earlier = |here: &[(WalFileName, SegmentName, _)]| {
        here.iter()
            .any(|(n, s, _)| matches!(n, WalFileName::Segment(_)) && *s < missing)
    };
    if !earlier(&here) && missing.log > 0 {
        here.extend(stored(missing.log - 1).await?);
    }
    let first_after = |partial: bool| {
        here.iter()
            .filter(|(n, s, _)| matches!(n, WalFileName::Partial(_)) == partial && *s > missing)
            .min_by_key(|(_, s, _)| *s)
            .map(|(_, s, t)| (*s, Some(*t)))
    };
    let segment_size = match repo.config().await? {
        Some(c) if c.wal_segment_size > 0 => Some(c.wal_segment_size),
        _ => None,
    };
    let later = match first_after(false) {
        Some((s, t)) => Some((Later::Segment(s), t)),
        None => match first_after(true) {
            Some((s, t)) => Some((Later::Partial(s), t)),
            None => match segment_size {
                Some(size) => branch_after(repo, missing, size)
                    .await?
                    .map(|(child, at)| (Later::Branch { child, at }, None)),
                None => None,
            },
        },
    };
    let Some((later, stored_at)) = later else {
        return Ok(Gap::None);
    };
    if !earlier(&here) {
        // The timeline starts later, unless its history says otherwise.
        let begins_by = match segment_size {
            Some(size) => timeline_begins_at(repo, missing.timeline)
                .await?
                .is_some_and(|begin| begin / u64::from(size) <= missing.segno(size)),
            None => false,
        };
        if !begins_by {
            return Ok(Gap::None);
        }
    }
    if trimmed_on_purpose(repo, missing).await? {
        return Ok(Gap::None);
    }
    let key = wal_key(&WalFileName::Segment(missing));
    let settles_at = Instant::now() + settle;
    let age = |t: chrono::DateTime<chrono::Utc>| (chrono::Utc::now() - t).to_std().ok();
    // A history file proves WAL that was written, not a push in flight.
    if let Some(stored_at) = stored_at {
        while age(stored_at).is_none_or(|a| a < settle) && Instant::now() < settles_at {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if repo.open_object(&key).await?.is_some() {
                return Ok(Gap::Settled);
            }
        }
    }
    Ok(Gap::Before(later))
}

/// A timeline's history as stored in the repository; `None` when it has no
/// history file or it cannot be read (then it proves nothing).
pub(super) async fn stored_ancestry(
    repo: &Repository,
    timeline: u32,
) -> Result<Option<crate::repository::archive::Ancestry>> {
    let key = wal_key(&WalFileName::TimelineHistory(timeline));
    let Some(bytes) = repo.get(&key).await? else {
        return Ok(None);
    };
    Ok(object::decode_limited(&bytes, 16 << 20)
        .ok()
        .map(|(_, text)| {
            crate::repository::archive::parse_history(&String::from_utf8_lossy(&text))
        }))
}

/// The first timeline above `missing`'s whose history says it left
/// `missing`'s timeline at or after the end of `missing`, and where. Reads
/// history files upwards until one is absent, as PostgreSQL looks for the
/// latest timeline.
pub(super) async fn branch_after(
    repo: &Repository,
    missing: SegmentName,
    segment_size: u32,
) -> Result<Option<(u32, u64)>> {
    let end = missing.start_lsn(segment_size) + u64::from(segment_size);
    for child in (missing.timeline.saturating_add(1)..).take(MAX_CHILD_TIMELINES as usize) {
        let Some(ancestry) = stored_ancestry(repo, child).await? else {
            return Ok(None);
        };
        if let Some(&(_, at)) = ancestry
            .iter()
            .find(|(parent, at)| *parent == missing.timeline && *at >= end)
        {
            return Ok(Some((child, at)));
        }
    }
    Ok(None)
}

/// Where `timeline` began (where it left its parent), by its history file.
pub(super) async fn timeline_begins_at(repo: &Repository, timeline: u32) -> Result<Option<u64>> {
    if timeline <= 1 {
        return Ok(None);
    }
    Ok(stored_ancestry(repo, timeline).await?.and_then(|a| {
        a.iter()
            .max_by_key(|(parent, _)| *parent)
            .map(|(_, at)| *at)
    }))
}

/// Whether `missing` lies where `prune --keep-wal-within` deletes WAL on
/// purpose (before retention.json's complete_from): there an older backup is
/// restorable only to its consistency point, and recovery reading ahead past
/// that point must find the end of the archive, as before.
pub(super) async fn trimmed_on_purpose(repo: &Repository, missing: SegmentName) -> Result<bool> {
    let Some(retention) = crate::repository::retention::load(repo).await? else {
        return Ok(false);
    };
    Ok(match repo.config().await? {
        Some(c) if c.wal_segment_size > 0 => {
            !retention.is_complete_from(missing.timeline, missing.segno(c.wal_segment_size))
        }
        _ => false,
    })
}

pub(super) async fn gap_error(
    repo: &Repository,
    missing: SegmentName,
    later: Later,
    dir: &Path,
) -> Error {
    let start = match repo.config().await {
        Ok(Some(c)) if c.wal_segment_size > 0 => format!(
            " (LSN {})",
            crate::pg::lsn::format_lsn(missing.start_lsn(c.wal_segment_size))
        ),
        _ => String::new(),
    };
    Error::corrupt(format!(
        "{missing} is not in {} but {}: the archived WAL has a gap; \
         if a copy of {missing} exists (pg_wal of the old server, another repository), \
         copy it into {} as {missing} and start the server again, PostgreSQL reads it \
         from there; otherwise only a recovery to a target before the gap{start} \
         can succeed",
        repo.url(),
        later.describe(),
        dir.display()
    ))
}
