//! Recovery targets: parsing them, choosing the backup that can reach them,
//! and the settings PostgreSQL needs to stop there.

use crate::error::{Error, Result};
use crate::format::manifest::Manifest;
use crate::repository::retention::Retention;
use chrono::{DateTime, FixedOffset, Utc};

pub use crate::recovery::target::{RecoveryTarget, on_lineage};

/// RFC 3339, or PostgreSQL's `YYYY-MM-DD HH:MM:SS[.ffffff]+ZZ[:MM]`. A time
/// without a zone is refused: guessing one moves a PITR by hours.
pub fn parse_time(s: &str) -> Result<DateTime<FixedOffset>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t);
    }
    // Accept `T` between date and time, and only there.
    let normalized = match s.as_bytes().get(10) {
        Some(b'T') if s.is_char_boundary(10) && s.is_char_boundary(11) => {
            format!("{} {}", &s[..10], &s[11..])
        }
        _ => s.to_string(),
    };
    for format in [
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M:%S%.f %#z",
        "%Y-%m-%d %H:%M:%S%.fZ",
    ] {
        if let Ok(t) = DateTime::parse_from_str(&normalized, format) {
            return Ok(t);
        }
    }
    if normalized.ends_with(" UTC") || normalized.ends_with('Z') {
        let base = normalized.trim_end_matches(" UTC").trim_end_matches('Z');
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(base, "%Y-%m-%d %H:%M:%S%.f") {
            return Ok(t.and_utc().fixed_offset());
        }
    }
    if chrono::NaiveDateTime::parse_from_str(&normalized, "%Y-%m-%d %H:%M:%S%.f").is_ok() {
        return Err(Error::usage(format!(
            "time '{s}' has no time zone; add one, e.g. '{s}+00' for UTC or '{s}+01' for UTC+1"
        )));
    }
    Err(Error::usage(format!(
        "cannot read time '{s}'; use RFC 3339 (2026-11-24T12:00:00Z) or 'YYYY-MM-DD HH:MM:SS+ZZ'"
    )))
}

impl RecoveryTarget {
    /// Picks the backup: the one named, or the newest one that was consistent
    /// before the target (only then can replay stop there).
    /// `retention`: where the archive holds all WAL on each timeline (see
    /// retention.json); xid and name targets cannot be placed in time, so
    /// they start from the oldest backup whose WAL is complete, which reaches
    /// any of them that lies after it.
    pub fn choose<'a>(
        &self,
        backups: &'a [Manifest],
        named: Option<&str>,
        retention: Option<&Retention>,
    ) -> Result<&'a Manifest> {
        let choice = crate::recovery::target::choose(self, backups, named, &|timeline, segno| {
            retention.is_none_or(|r| r.is_complete_from(timeline, segno))
        })?;
        if let Some(note) = choice.note {
            tracing::info!("{note}");
        }
        Ok(choice.backup)
    }

    /// postgresql.auto.conf lines naming the target.
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        match self {
            RecoveryTarget::Latest => vec![],
            RecoveryTarget::Time(t) => vec![(
                "recovery_target_time",
                t.with_timezone(&Utc)
                    .format("%Y-%m-%d %H:%M:%S%.6f+00")
                    .to_string(),
            )],
            RecoveryTarget::Lsn(l) => vec![("recovery_target_lsn", l.to_string())],
            RecoveryTarget::Xid(x) => vec![("recovery_target_xid", x.clone())],
            RecoveryTarget::Name(n) => vec![("recovery_target_name", n.clone())],
            RecoveryTarget::Immediate => vec![("recovery_target", "immediate".into())],
        }
    }
}

/// Warns (one line) when recovery to latest would not simply replay the
/// backup's own timeline. Reads the history files PostgreSQL would probe;
/// failing to read them only means no warning.
pub async fn warn_about_latest(repo: &crate::repository::Repository, backup: &Manifest) {
    let mut found = std::collections::BTreeMap::new();
    for t in (backup.timeline.saturating_add(1)..).take(1000) {
        let Some(ancestry) = read_history(repo, t).await else {
            break;
        };
        found.insert(t, ancestry);
    }
    if let Some(w) = latest_timeline_warning(backup, &|t| found.get(&t).cloned()) {
        tracing::warn!("{w}");
    }
}

/// What `recovery_target_timeline = 'latest'` makes of a backup, judged the
/// way PostgreSQL does: it takes the highest timeline N whose history file
/// exists counting up from the backup's timeline T (`history(t)`: timeline
/// t's parents, `None` when t has no history file, `Some(empty)` when it
/// cannot be read), and refuses to start unless the backup lies on N's
/// history before N left T. A timeline archived by a restored copy (or a
/// promoted standby) therefore steers every later restore to latest:
/// returns a warning when it does, saying what to do instead.
pub fn latest_timeline_warning(
    backup: &Manifest,
    history: &dyn Fn(u32) -> Option<crate::repository::archive::Ancestry>,
) -> Option<String> {
    let here = backup.timeline;
    let (n, switch) = latest_timeline(backup, history)?;
    let stay = format!(
        "to replay timeline {here} instead, set recovery_target_timeline = 'current' in postgresql.auto.conf before starting"
    );
    let Some(switch) = switch else {
        return Some(format!(
            "the repository holds timeline {n}, which does not branch from timeline {here} of backup {} (or its history file is unreadable): PostgreSQL will refuse to recover it to latest; {stay}",
            backup.id
        ));
    };
    let at = crate::pg::lsn::format_lsn(switch);
    if switch < backup.stop_lsn.0 {
        return Some(format!(
            "the repository holds timeline {n}, which left timeline {here} at {at}, before backup {} was consistent ({}): a restored copy or promoted standby archived it, and PostgreSQL will refuse to recover this backup to latest ('requested timeline {n} is not a child of this server's history'); {stay}",
            backup.id, backup.stop_lsn
        ));
    }
    Some(format!(
        "recovery to latest will leave timeline {here} at {at} and follow timeline {n}, which a restored copy or promoted standby archived into this repository; {stay}"
    ))
}

/// The timeline `recovery_target_timeline = 'latest'` recovers a backup
/// along (the highest N whose history file exists counting up from the
/// backup's timeline), and where N's history says it left the backup's
/// timeline (`None`: it does not descend from it, or its history is
/// unreadable); `None` when no newer timeline exists.
fn latest_timeline(
    backup: &Manifest,
    history: &dyn Fn(u32) -> Option<crate::repository::archive::Ancestry>,
) -> Option<(u32, Option<u64>)> {
    const MAX_PROBES: usize = 1000;
    let here = backup.timeline;
    let mut newest = None;
    for t in (here.saturating_add(1)..).take(MAX_PROBES) {
        match history(t) {
            Some(a) => newest = Some((t, a)),
            None => break,
        }
    }
    let (n, ancestry) = newest?;
    let switch = ancestry
        .iter()
        .find(|(parent, _)| *parent == here)
        .map(|&(_, at)| at);
    Some((n, switch))
}

/// Whether PostgreSQL would refuse to recover `backup` to the latest
/// timeline: that timeline does not descend from the backup's, or left it
/// before the backup was consistent.
pub fn latest_refuses(
    backup: &Manifest,
    history: &dyn Fn(u32) -> Option<crate::repository::archive::Ancestry>,
) -> bool {
    match latest_timeline(backup, history) {
        None => false,
        Some((_, None)) => true,
        Some((_, Some(switch))) => switch < backup.stop_lsn.0,
    }
}

/// The backups recovery to the latest timeline can start from: without
/// this, a time or LSN target could pick the newest backup before it even
/// though a restored copy's timeline left that backup's timeline before the
/// backup was consistent, and PostgreSQL would refuse to start. When every
/// backup would be refused, all of them are kept (restore then warns).
pub async fn recoverable_to_latest(
    repo: &crate::repository::Repository,
    backups: Vec<Manifest>,
) -> Vec<Manifest> {
    let mut histories: std::collections::BTreeMap<
        u32,
        Option<crate::repository::archive::Ancestry>,
    > = std::collections::BTreeMap::new();
    for b in &backups {
        for t in (b.timeline.saturating_add(1)..).take(1000) {
            if let Some(known) = histories.get(&t) {
                if known.is_none() {
                    break;
                }
                continue;
            }
            let found = read_history(repo, t).await;
            let missing = found.is_none();
            histories.insert(t, found);
            if missing {
                break;
            }
        }
    }
    let history = |t: u32| histories.get(&t).cloned().flatten();
    let usable: Vec<Manifest> = backups
        .iter()
        .filter(|b| !latest_refuses(b, &history))
        .cloned()
        .collect();
    if usable.is_empty() { backups } else { usable }
}

/// Timeline `t`'s history as PostgreSQL would probe it: `None` when it has
/// no history file, empty ancestry when the file cannot be read.
async fn read_history(
    repo: &crate::repository::Repository,
    t: u32,
) -> Option<crate::repository::archive::Ancestry> {
    use crate::pg::wal::WalFileName;
    let key = crate::format::key::wal_key(&WalFileName::TimelineHistory(t));
    let Ok(Some(bytes)) = repo.get(&key).await else {
        return None;
    };
    Some(
        crate::format::object::decode_limited(&bytes, 16 << 20)
            .map(|(_, text)| {
                crate::repository::archive::parse_history(&String::from_utf8_lossy(&text))
            })
            .unwrap_or_default(),
    )
}

/// Timeline `n`'s ancestors as its history file in the repository lists
/// them (none for timeline 1).
pub async fn ancestry_of(
    repo: &crate::repository::Repository,
    n: u32,
) -> Result<crate::repository::archive::Ancestry> {
    use crate::pg::wal::WalFileName;
    if n <= 1 {
        return Ok(vec![]);
    }
    let key = crate::format::key::wal_key(&WalFileName::TimelineHistory(n));
    let Some(bytes) = repo.get(&key).await? else {
        return Err(Error::not_found(format!(
            "timeline {n} has no history file ({n:08X}.history) in the repository; \
             'walvault status' shows the timelines"
        )));
    };
    let (_, text) = crate::format::object::decode_limited(&bytes, 16 << 20)
        .map_err(|e| Error::corrupt(format!("the history file of timeline {n} is damaged: {e}")))?;
    Ok(crate::repository::archive::parse_history(
        &String::from_utf8_lossy(&text),
    ))
}

/// A value in postgresql.conf syntax: single-quoted, quotes doubled.
pub fn conf_quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::lsn::Lsn;

    #[test]
    fn times() {
        let want = DateTime::parse_from_rfc3339("2026-11-24T12:00:00Z").unwrap();
        for ok in [
            "2026-11-24T12:00:00Z",
            "2026-11-24 12:00:00+00",
            "2026-11-24 12:00:00+00:00",
            "2026-11-24 13:00:00+01",
            "2026-11-24 12:00:00 UTC",
            "2026-11-24T13:00:00+01:00",
        ] {
            assert_eq!(parse_time(ok).unwrap(), want, "{ok}");
        }
        assert_eq!(
            parse_time("2026-11-24 12:00:00.250+00")
                .unwrap()
                .timestamp_subsec_millis(),
            250
        );
        let e = parse_time("2026-11-24 12:00:00").unwrap_err();
        assert!(e.message().contains("no time zone"), "{e}");
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(conf_quote("a'b"), "'a''b'");
    }

    fn backup(timeline: u32, start: u64, stop: u64) -> Manifest {
        Manifest {
            format: 1,
            id: "20261127T153444Z".into(),
            pg_version: 150000,
            system_identifier: "1".into(),
            wal_segment_size: 1 << 24,
            timeline,
            start_lsn: Lsn(start),
            stop_lsn: Lsn(stop),
            start_time: Utc::now(),
            stop_time: Utc::now(),
            backup_label: String::new(),
            tablespace_map: None,
            tablespaces: vec![],
            directories: vec![],
            files: vec![],
            stats: Default::default(),
        }
    }

    #[test]
    fn backups_on_a_timelines_lineage() {
        // Timeline 3 left 2 at 0x500, which had left 1 at 0x300.
        let ancestry = vec![(2, 0x500), (1, 0x300)];
        let all = vec![
            backup(1, 0x100, 0x200), // before the branch: on the lineage
            backup(1, 0x380, 0x400), // timeline 1 after 2 left it: not
            backup(2, 0x400, 0x480), // timeline 2 before 3 left it
            backup(2, 0x600, 0x700), // timeline 2 after: not
            backup(3, 0x800, 0x900),
            backup(4, 0x800, 0x900), // another branch: not
        ];
        let kept: Vec<(u32, u64)> = on_lineage(&all, 3, &ancestry)
            .iter()
            .map(|b| (b.timeline, b.start_lsn.0))
            .collect();
        assert_eq!(kept, vec![(1, 0x100), (2, 0x400), (3, 0x800)]);
        assert_eq!(on_lineage(&all, 1, &vec![]).len(), 2);
    }

    #[test]
    fn a_branched_timeline_steers_latest() {
        // Timeline 2 left timeline 1 at 0/5000000.
        let histories = |t: u32| match t {
            2 => Some(vec![(1, 0x500_0000)]),
            _ => None,
        };
        // Alone on its timeline: nothing to say.
        assert_eq!(
            latest_timeline_warning(&backup(2, 0x600_0000, 0x700_0000), &histories),
            None
        );
        assert_eq!(
            latest_timeline_warning(&backup(1, 0x100_0000, 0x200_0000), &|_| None),
            None
        );
        // Before the branch: recovery follows timeline 2.
        let w = latest_timeline_warning(&backup(1, 0x100_0000, 0x200_0000), &histories).unwrap();
        assert!(
            w.contains("leave timeline 1 at 0/5000000 and follow timeline 2"),
            "{w}"
        );
        assert!(w.contains("recovery_target_timeline = 'current'"), "{w}");
        // After the branch: PostgreSQL refuses.
        let w = latest_timeline_warning(&backup(1, 0x600_0000, 0x700_0000), &histories).unwrap();
        assert!(
            w.contains("will refuse to recover this backup to latest"),
            "{w}"
        );
        // An unreadable history is no ground to promise anything.
        let w = latest_timeline_warning(&backup(1, 0x100_0000, 0x200_0000), &|t| {
            (t == 2).then(Vec::new)
        })
        .unwrap();
        assert!(w.contains("does not branch from timeline 1"), "{w}");
    }

    #[test]
    fn latest_refuses_exactly_what_postgresql_refuses() {
        // Timeline 2 left timeline 1 at 0/5000000.
        let histories = |t: u32| match t {
            2 => Some(vec![(1, 0x500_0000)]),
            _ => None,
        };
        // Consistent before the branch, or on timeline 2 itself: usable.
        assert!(!latest_refuses(
            &backup(1, 0x100_0000, 0x200_0000),
            &histories
        ));
        assert!(!latest_refuses(
            &backup(1, 0x400_0000, 0x500_0000),
            &histories
        ));
        assert!(!latest_refuses(
            &backup(2, 0x600_0000, 0x700_0000),
            &histories
        ));
        // Consistent only after timeline 2 left: refused.
        assert!(latest_refuses(
            &backup(1, 0x400_0000, 0x500_0001),
            &histories
        ));
        assert!(latest_refuses(
            &backup(1, 0x600_0000, 0x700_0000),
            &histories
        ));
        // A newer timeline that does not descend from the backup's: refused.
        assert!(latest_refuses(&backup(1, 0x100_0000, 0x200_0000), &|t| (t
            == 2)
            .then(Vec::new)));
        // No newer timeline at all: nothing to refuse.
        assert!(!latest_refuses(&backup(1, 0x600_0000, 0x700_0000), &|_| {
            None
        }));
    }
}
