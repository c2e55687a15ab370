//! `walvault status`: what the repository can recover, at a glance.

use crate::error::{Error, ErrorKind, Result};
use crate::format::manifest::Manifest;
use crate::human::format_duration;
use crate::human::human_bytes;
use crate::pg::lsn::Lsn;
use crate::repository::archive::WalArchive;
use crate::repository::catalog;
use crate::repository::{RepoUrl, Repository};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::time::Duration;

// The doc comments are `walvault status --help`.
#[derive(clap::Args)]
pub struct StatusOptions {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Exit 6 when the newest archived WAL is older than this (e.g. 15m).
    #[arg(long, env = "WALVAULT_MAX_AGE", value_parser = crate::human::parse_duration)]
    pub max_age: Option<Duration>,
    /// Draw the timeline picture even when not on a terminal.
    #[arg(long)]
    pub graph: bool,
}

#[derive(Serialize)]
struct TimelineWal {
    timeline: u32,
    first: String,
    last: String,
    segments: usize,
    missing: Vec<String>,
    /// Where this timeline left its parent, from its history file.
    #[serde(skip_serializing_if = "Option::is_none")]
    branched_from: Option<Branch>,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct Branch {
    pub timeline: u32,
    pub lsn: String,
    /// The parent's WAL goes on past the branch point: two histories were
    /// archived side by side, as a restored copy (or a promoted standby
    /// whose old primary kept writing) does. Restores to `latest` from the
    /// parent's backups then follow this timeline, or fail.
    pub parent_went_on: bool,
}

/// Where `timeline` left its nearest parent, and whether the parent's WAL
/// in the archive goes on past that point.
pub fn branch_of(archive: &WalArchive, timeline: u32) -> Option<Branch> {
    let &(parent, switch) = archive.ancestry.get(&timeline)?.first()?;
    let switch_segno = Lsn(switch).segno(archive.segment_size);
    let parent_went_on = archive
        .segments
        .get(&parent)
        .and_then(|s| s.keys().next_back())
        .is_some_and(|&last| last > switch_segno);
    Some(Branch {
        timeline: parent,
        lsn: crate::pg::lsn::format_lsn(switch),
        parent_went_on,
    })
}

pub use crate::recovery::windows::Window;

#[derive(Serialize)]
struct Status {
    repository: String,
    format: u32,
    system_identifier: String,
    pg_version: u32,
    wal_segment_size: u32,
    backups: usize,
    oldest_backup: Option<String>,
    newest_backup: Option<String>,
    wal: Vec<TimelineWal>,
    recoverable: Vec<Window>,
    stored_bytes: u64,
    last_archived: Option<String>,
    last_archived_at: Option<DateTime<Utc>>,
    last_archived_age_seconds: Option<i64>,
    /// The clusters that archived here before an upgrade, oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    earlier_clusters: Vec<EarlierCluster>,
}

/// A cluster that archived into the repository before an upgrade bound
/// another: its backups stay restorable until prune lets them go.
#[derive(Serialize)]
struct EarlierCluster {
    system_identifier: String,
    pg_version: u32,
    backups: usize,
}

/// Each backup can reach from its consistency point (`stop_time`) to the
/// archive time of the last segment it can replay without a gap; overlapping
/// spans are merged. The end is when that segment was archived, a moment at
/// or after its last commit.
pub fn recoverable_windows(archive: &WalArchive, backups: &[Manifest]) -> Vec<Window> {
    crate::recovery::windows::recoverable(&archive.segments, backups, archive.segment_size, |f| {
        f.meta.last_modified
    })
}

/// Sharpens each window's end to the last commit or abort in its WAL, the
/// latest moment a time target can name (PostgreSQL refuses a target time
/// past the last transaction it replays). Reads back from the last segment,
/// a few segments at most.
async fn end_at_last_commit(
    repo: &Repository,
    archive: &WalArchive,
    windows: &mut [Window],
) -> Result<()> {
    const LOOK_BACK: u64 = 8;
    for w in windows.iter_mut() {
        let segs = &archive.segments[&w.timeline];
        for segno in (w.end_segno.saturating_sub(LOOK_BACK)..=w.end_segno).rev() {
            let Some(file) = segs.get(&segno) else { break };
            let Some(bytes) = repo.get(&file.meta.key).await? else {
                break;
            };
            let Ok((_, segment)) = crate::format::object::decode(&bytes) else {
                break;
            };
            if let Some(t) = crate::pg::walscan::last_transaction_time(&segment) {
                w.to = t.max(w.from);
                w.to_is_last_commit = true;
                break;
            }
        }
    }
    Ok(())
}

pub async fn run(url: &RepoUrl, opts: &StatusOptions) -> Result<()> {
    let root_repo = Repository::open(url, false)?;
    let root = root_repo.require_config().await?;
    // The cluster archiving now (after an upgrade, the one in its folder),
    // and the ones before it.
    let mut earlier_clusters = vec![];
    for c in root_repo.clusters(&root).into_iter().filter(|c| !c.current) {
        earlier_clusters.push(EarlierCluster {
            backups: catalog::ids(&c.repo).await?.len(),
            system_identifier: c.config.system_identifier,
            pg_version: c.config.pg_version,
        });
    }
    let current = root_repo.current(&root);
    let (repo, config) = (current.repo, current.config);
    let backups = catalog::load_readable(&repo).await?;
    let archive = WalArchive::load(&repo, config.wal_segment_size).await?;
    // The whole repository, every cluster's objects.
    let stored_bytes: u64 = root_repo.list("").await?.iter().map(|m| m.size).sum();
    let newest = archive.newest();
    let now = Utc::now();
    let mut recoverable = recoverable_windows(&archive, &backups);
    end_at_last_commit(&repo, &archive, &mut recoverable).await?;
    let status = Status {
        repository: url.to_string(),
        format: root.format,
        system_identifier: config.system_identifier.clone(),
        pg_version: config.pg_version,
        wal_segment_size: config.wal_segment_size,
        backups: backups.len(),
        oldest_backup: backups.first().map(|b| b.id.clone()),
        newest_backup: backups.last().map(|b| b.id.clone()),
        wal: archive
            .segments
            .iter()
            .map(|(&timeline, segs)| TimelineWal {
                timeline,
                first: segs
                    .values()
                    .next()
                    .map(|f| f.name.to_string())
                    .unwrap_or_default(),
                last: segs
                    .values()
                    .next_back()
                    .map(|f| f.name.to_string())
                    .unwrap_or_default(),
                segments: segs.len(),
                missing: archive
                    .gaps(timeline, None)
                    .into_iter()
                    .map(|n| archive.segment_name(timeline, n).to_string())
                    .collect(),
                branched_from: branch_of(&archive, timeline),
            })
            .collect(),
        recoverable,
        stored_bytes,
        last_archived: newest.map(|f| f.name.to_string()),
        last_archived_at: newest.map(|f| f.meta.last_modified),
        last_archived_age_seconds: newest
            .map(|f| (now - f.meta.last_modified).num_seconds().max(0)),
        earlier_clusters,
    };
    if opts.json {
        crate::say!("{}", serde_json::to_string_pretty(&status).expect("json"));
    } else {
        print_text(&status, &backups, opts.graph)?;
    }
    if let Some(max) = opts.max_age {
        let age = status
            .last_archived_age_seconds
            .map(|s| Duration::from_secs(s as u64));
        match age {
            Some(a) if a <= max => {}
            Some(a) => {
                return Err(Error::new(
                    ErrorKind::Stale,
                    format!(
                        "newest archived WAL is {} old, more than --max-age {}: check archive_command and pg_stat_archiver",
                        format_duration(a),
                        format_duration(max)
                    ),
                ));
            }
            None => {
                return Err(Error::new(
                    ErrorKind::Stale,
                    "the repository holds no WAL segment yet",
                ));
            }
        }
    }
    Ok(())
}

fn fmt_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S+00").to_string()
}

fn print_text(s: &Status, backups: &[Manifest], graph: bool) -> Result<()> {
    crate::say!("repository   {} (format {})", s.repository, s.format);
    crate::say!(
        "cluster      {} (PostgreSQL {}, {} MiB segments)",
        s.system_identifier,
        s.pg_version,
        s.wal_segment_size >> 20
    );
    for e in &s.earlier_clusters {
        crate::say!(
            "earlier      cluster {} (PostgreSQL {}), before an upgrade: {} backups",
            e.system_identifier,
            e.pg_version,
            e.backups
        );
    }
    match (backups.first(), backups.last()) {
        (Some(o), Some(n)) => crate::say!(
            "backups      {} (oldest {} at {}, newest {} at {})",
            s.backups,
            o.id,
            fmt_time(o.stop_time),
            n.id,
            fmt_time(n.stop_time)
        ),
        _ => crate::say!("backups      none: run 'walvault backup'"),
    }
    if s.wal.is_empty() {
        crate::say!("wal          none archived yet");
    }
    for t in &s.wal {
        let gaps = match t.missing.len() {
            0 => "no gaps".to_string(),
            n => format!("{n} missing, first {}", t.missing[0]),
        };
        crate::say!(
            "wal          timeline {}: {} .. {} ({} segments, {gaps})",
            t.timeline,
            t.first,
            t.last,
            t.segments
        );
        if let Some(b) = &t.branched_from {
            crate::say!(
                "             timeline {} branched from timeline {} at {}{}",
                t.timeline,
                b.timeline,
                b.lsn,
                if b.parent_went_on {
                    format!(
                        ", while timeline {} went on: a restored copy archived it here, and restores to latest from timeline-{} backups follow it or fail",
                        b.timeline, b.timeline
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    if s.recoverable.is_empty() {
        crate::say!(
            "recoverable  nothing yet: a restore needs a backup and the WAL from its start"
        );
    }
    for w in &s.recoverable {
        crate::say!(
            "recoverable  {} .. {} (timeline {}, from backup {}; {})",
            fmt_time(w.from),
            fmt_time(w.to),
            w.timeline,
            w.from_backup,
            if w.to_is_last_commit {
                "the end is the last archived commit"
            } else {
                "the end is when the last segment was archived"
            }
        );
    }
    crate::say!("stored       {}", human_bytes(s.stored_bytes));
    if let (Some(name), Some(at), Some(age)) = (
        &s.last_archived,
        s.last_archived_at,
        s.last_archived_age_seconds,
    ) {
        crate::say!(
            "last wal     {name} archived {} ({} ago)",
            fmt_time(at),
            format_duration(Duration::from_secs(age as u64))
        );
    }
    use std::io::IsTerminal;
    if graph || std::io::stdout().is_terminal() {
        print_graph(s, backups)?;
    }
    Ok(())
}

/// A picture of the last stretch of time: backups as `B`, recoverable time
/// as `=`, time that cannot be reached as `.`.
fn print_graph(s: &Status, backups: &[Manifest]) -> Result<()> {
    const WIDTH: usize = 64;
    let now = Utc::now();
    let Some(start) = backups
        .iter()
        .map(|b| b.start_time)
        .chain(s.recoverable.iter().map(|w| w.from))
        .min()
    else {
        return Ok(());
    };
    let span = (now - start).num_milliseconds().max(1) as f64;
    let col = |t: DateTime<Utc>| {
        (((t - start).num_milliseconds() as f64 / span) * (WIDTH - 1) as f64).round() as usize
    };
    let mut line = vec!['.'; WIDTH];
    for w in &s.recoverable {
        for c in line
            .iter_mut()
            .take(col(w.to).min(WIDTH - 1) + 1)
            .skip(col(w.from))
        {
            *c = '=';
        }
    }
    for b in backups {
        line[col(b.stop_time).min(WIDTH - 1)] = 'B';
    }
    crate::say!();
    crate::say!("  {}", fmt_time(start));
    crate::say!("  |{}| now", line.iter().collect::<String>());
    crate::say!("  B backup   = recoverable   . not recoverable");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_stopping_on_a_segment_boundary_has_a_window() {
        let mut archive = WalArchive {
            segment_size: 1 << 24,
            ..Default::default()
        };
        let name = "000000010000000000000002";
        archive.segments.entry(1).or_default().insert(
            2,
            crate::repository::archive::ArchivedFile {
                name: crate::pg::wal::WalFileName::parse(name).unwrap(),
                meta: crate::repository::ObjectInfo {
                    key: name.into(),
                    last_modified: Utc::now(),
                    size: 0,
                },
            },
        );
        let now = Utc::now();
        let backup = Manifest {
            format: 1,
            id: "20261127T153444Z".into(),
            pg_version: 150000,
            system_identifier: "1".into(),
            wal_segment_size: 1 << 24,
            timeline: 1,
            start_lsn: crate::pg::lsn::Lsn((2 << 24) + 40),
            stop_lsn: crate::pg::lsn::Lsn(3 << 24),
            start_time: now,
            stop_time: now,
            backup_label: String::new(),
            tablespace_map: None,
            tablespaces: vec![],
            directories: vec![],
            files: vec![],
            stats: Default::default(),
        };
        let windows = recoverable_windows(&archive, &[backup]);
        assert_eq!(windows.len(), 1);
        assert_eq!(windows[0].end_segno, 2);
    }

    #[test]
    fn a_branch_beside_a_living_parent_is_shown() {
        let mut archive = WalArchive {
            segment_size: 1 << 24,
            ..Default::default()
        };
        assert_eq!(branch_of(&archive, 1), None);
        archive.ancestry.insert(2, vec![(1, 0x500_00A0)]);
        let file = |name: &str| crate::repository::archive::ArchivedFile {
            name: crate::pg::wal::WalFileName::parse(name).unwrap(),
            meta: crate::repository::ObjectInfo {
                key: name.into(),
                last_modified: Utc::now(),
                size: 0,
            },
        };
        // A promotion: the parent ends at the branch point.
        archive
            .segments
            .entry(1)
            .or_default()
            .insert(5, file("000000010000000000000005"));
        let b = branch_of(&archive, 2).unwrap();
        assert_eq!(
            (b.timeline, b.lsn.as_str(), b.parent_went_on),
            (1, "0/50000A0", false)
        );
        // A restored copy: the parent goes on past it.
        archive
            .segments
            .entry(1)
            .or_default()
            .insert(9, file("000000010000000000000009"));
        assert!(branch_of(&archive, 2).unwrap().parent_went_on);
    }
}
