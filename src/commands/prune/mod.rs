//! `walvault prune`: delete backups outside the retention policy, then the WAL
//! no kept backup needs, then the packs no remaining manifest references.

mod plan;

pub use plan::Policy;

use crate::error::{Error, Result};
use crate::format::key::{Key, PACK_DIR, is_pack_id, manifest_key};
use crate::format::manifest::Manifest;
use crate::human::human_bytes;
use crate::repository::archive::WalArchive;
use crate::repository::catalog;
use crate::repository::lock::{self, Lease, RepoLock};
use crate::repository::{Leftover, RepoUrl, Repository};
use std::collections::HashSet;

// The doc comments are `walvault prune --help`.
#[derive(clap::Args)]
pub struct PruneOptions {
    #[command(flatten)]
    pub policy: Policy,
    /// Print what would be deleted, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    // The global --quiet.
    #[arg(skip)]
    pub quiet: bool,
}

/// What one prune removes, in the order it removes it.
#[derive(Default)]
struct Doomed {
    backups: Vec<(String, Key, u64)>,
    wal: Vec<(Key, u64)>,
    packs: Vec<(Key, u64)>,
    packs_kept_because: Option<String>,
    /// Staged files of killed writes (local repositories only).
    leftovers: Vec<Leftover>,
}

impl Doomed {
    fn bytes(&self) -> u64 {
        self.backups.iter().map(|b| b.2).sum::<u64>()
            + self.wal.iter().map(|w| w.1).sum::<u64>()
            + self.packs.iter().map(|p| p.1).sum::<u64>()
            + self.leftovers.iter().map(|l| l.size).sum::<u64>()
    }
}

pub async fn run(url: &RepoUrl, opts: &PruneOptions) -> Result<()> {
    let p = &opts.policy;
    if p.keep_last.is_none() && p.keep_within.is_none() && p.keep_wal_within.is_none() {
        return Err(Error::usage(
            "prune needs a policy: --keep-last N, --keep-within DURATION and/or --keep-wal-within DURATION",
        ));
    }
    if p.keep_last == Some(0) {
        return Err(Error::usage(
            "--keep-last must be at least 1 (the newest backup is always kept)",
        ));
    }
    let root_repo = Repository::open(url, false)?;
    let root = root_repo.require_config().await?;
    let doomed = if root.upgrades.is_empty() {
        prune_cluster(&root_repo, root.wal_segment_size, opts, None).await?
    } else {
        // Several clusters (after an upgrade): the policy counts every
        // cluster's backups together, newest first, so older clusters'
        // backups age out as the current one takes new ones; then each
        // cluster is pruned under its own lock.
        let clusters = root_repo.clusters(&root);
        let mut all = vec![];
        let mut owner = vec![];
        for (i, c) in clusters.iter().enumerate() {
            let backups = catalog::load_all(&c.repo).await?;
            owner.extend(std::iter::repeat_n(i, backups.len()));
            all.extend(backups);
        }
        let mut order: Vec<usize> = (0..all.len()).collect();
        order.sort_by(|&a, &b| {
            (all[a].start_time, &all[a].id).cmp(&(all[b].start_time, &all[b].id))
        });
        let sorted: Vec<Manifest> = order.iter().map(|&i| all[i].clone()).collect();
        let keep = plan::backups_to_keep(&sorted, &opts.policy, chrono::Utc::now());
        // Per cluster: an id names a backup only within its cluster.
        let mut outside: Vec<HashSet<String>> = vec![HashSet::new(); clusters.len()];
        for (&i, _) in order.iter().zip(&keep).filter(|(_, k)| !**k) {
            outside[owner[i]].insert(all[i].id.clone());
        }
        let mut total = Doomed::default();
        for (i, c) in clusters.iter().enumerate() {
            let scope = Scope {
                outside: &outside[i],
                retired: !c.current,
            };
            let d = prune_cluster(&c.repo, c.config.wal_segment_size, opts, Some(scope)).await?;
            total.backups.extend(d.backups);
            total.wal.extend(d.wal);
            total.packs.extend(d.packs);
            total.leftovers.extend(d.leftovers);
            total.packs_kept_because = total.packs_kept_because.or(d.packs_kept_because);
        }
        total
    };
    if !opts.quiet {
        let verb = if opts.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        crate::say!(
            "prune: {verb} {} backups, {} WAL files, {} packs{}; {} {}{}",
            doomed.backups.len(),
            doomed.wal.len(),
            doomed.packs.len(),
            match doomed.leftovers.len() {
                0 => String::new(),
                n => format!(", {n} files of interrupted writes"),
            },
            human_bytes(doomed.bytes()),
            if opts.dry_run {
                "would be freed"
            } else {
                "freed"
            },
            doomed
                .packs_kept_because
                .as_deref()
                .map(|w| format!(" (packs kept: {w})"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// What a prune of one cluster of several may delete.
#[derive(Clone, Copy)]
struct Scope<'a> {
    /// This cluster's backups outside the policy, judged across every
    /// cluster; any other backup (one published since, too) is kept.
    outside: &'a HashSet<String>,
    /// The cluster archives here no more (another was bound by upgrade):
    /// with none of its backups kept, none of its WAL is needed.
    retired: bool,
}

/// Prunes one cluster's objects (`repo` as that cluster sees the
/// repository) under its lock; `scope` when the repository has several.
async fn prune_cluster(
    repo: &Repository,
    segment_size: u32,
    opts: &PruneOptions,
    scope: Option<Scope<'_>>,
) -> Result<Doomed> {
    // A dry run changes nothing, not even a lock object.
    let lock = if opts.dry_run {
        None
    } else {
        Some(RepoLock::acquire(repo, "prune").await?)
    };
    // The lock's lease is renewed while prune works, so a long prune is never
    // judged gone; losing it (a stopped process) stops prune.
    let result = match &lock {
        Some(lock) => {
            lock.hold(prune(repo, segment_size, opts, Some(lock.lease()), scope))
                .await
        }
        None => prune(repo, segment_size, opts, None, scope).await,
    };
    if let Some(lock) = lock {
        lock.release().await?;
    }
    result
}

/// Every deletion first checks `lease` (the lock's), so a prune that stalled
/// past its lease deletes nothing more: a backup may have taken the lock since.
async fn prune(
    repo: &Repository,
    segment_size: u32,
    opts: &PruneOptions,
    lease: Option<&Lease<'_>>,
    scope: Option<Scope<'_>>,
) -> Result<Doomed> {
    let now = chrono::Utc::now();
    let in_progress = lock::live_backups(repo, opts.dry_run).await?;
    let backups = catalog::load_all(repo).await?;
    let manifest_sizes: std::collections::HashMap<String, u64> = repo
        .list(crate::format::key::BACKUP_DIR)
        .await?
        .into_iter()
        .filter_map(|m| crate::format::key::backup_id_of_key(&m.key).map(|id| (id, m.size)))
        .collect();
    let keep = match scope {
        None => plan::backups_to_keep(&backups, &opts.policy, now),
        Some(scope) => backups
            .iter()
            .map(|b| !scope.outside.contains(&b.id))
            .collect(),
    };
    let kept: Vec<&Manifest> = backups
        .iter()
        .zip(&keep)
        .filter(|(_, k)| **k)
        .map(|(b, _)| b)
        .collect();

    let mut doomed = Doomed::default();
    for (b, _) in backups.iter().zip(&keep).filter(|(_, k)| !**k) {
        doomed.backups.push((
            b.id.clone(),
            manifest_key(&b.id),
            manifest_sizes.get(&b.id).copied().unwrap_or(0),
        ));
    }

    // WAL: with no backup at all, nothing can say what is needed: keep it
    // all; unless the cluster archives here no more, and none of its
    // backups is kept: then nothing can ever replay it.
    let retired = scope.is_some_and(|s| s.retired);
    if kept.is_empty() && retired && in_progress.is_empty() {
        let archive = WalArchive::load(repo, segment_size).await?;
        doomed.wal.extend(
            archive
                .all_files()
                .map(|f| (f.meta.key.clone(), f.meta.size)),
        );
    } else if !kept.is_empty() {
        let archive = WalArchive::load(repo, segment_size).await?;
        let mut needs = plan::wal_needs(&kept, &opts.policy, now, segment_size);
        let running: Vec<lock::WalStart> = in_progress.iter().filter_map(|b| b.wal_start).collect();
        needs.extend(plan::in_progress_needs(&running, segment_size));
        for need in &needs {
            tracing::debug!("keeping WAL {}", plan::describe_need(need, segment_size));
        }
        for (&timeline, segments) in &archive.segments {
            for (&segno, file) in segments {
                if !plan::is_needed(&archive, &needs, timeline, segno) {
                    doomed.wal.push((file.meta.key.clone(), file.meta.size));
                }
            }
        }
        for (segno, file) in &archive.others {
            if !plan::is_needed(&archive, &needs, file.name.timeline(), *segno) {
                doomed.wal.push((file.meta.key.clone(), file.meta.size));
            }
        }
        // Timeline history files stay: tiny, and recovery needs every one of
        // the timelines it may follow.
        if !opts.dry_run
            && let Some(record) =
                crate::repository::retention::Retention::new(plan::complete_from(&needs), now)
        {
            check(lease, "record what WAL is kept")?;
            crate::repository::retention::store(repo, &record).await?;
        }
    }

    // Packs: only when no backup is in progress (it may use any of them).
    if let Some(b) = in_progress.first() {
        doomed.packs_kept_because = Some(format!("{} is in progress", b.holder.describe()));
    } else {
        let referenced: HashSet<&str> = kept
            .iter()
            .flat_map(|m| {
                m.files
                    .iter()
                    .flat_map(|f| f.chunks.iter().map(|c| c.pack.as_str()))
            })
            .collect();
        for meta in repo.list(PACK_DIR).await? {
            let Some(id) = meta.key.filename().and_then(|f| f.strip_suffix(".pack")) else {
                continue;
            };
            if is_pack_id(id) && !referenced.contains(id) {
                doomed.packs.push((meta.key.clone(), meta.size));
            }
        }
    }

    doomed.leftovers = repo.leftovers().await?;

    if opts.dry_run {
        if !opts.quiet {
            for (id, key, _) in &doomed.backups {
                crate::say!("would delete backup {id} ({key})");
            }
            for (key, _) in doomed.wal.iter().chain(&doomed.packs) {
                crate::say!("would delete {key}");
            }
            for l in &doomed.leftovers {
                crate::say!(
                    "would delete {} (left by an interrupted write)",
                    l.path.display()
                );
            }
        }
        return Ok(doomed);
    }
    // Manifests first: once a backup is gone from the listing nothing uses
    // its WAL or packs, so a crash part-way leaves garbage, never a broken backup.
    for (id, key, _) in &doomed.backups {
        check(lease, &format!("delete backup {id}"))?;
        repo.delete(key).await?;
        tracing::info!("deleted backup {id}");
    }
    delete_all(repo, &doomed.wal, lease).await?;
    // Time has passed since the plan: a backup may have started (and be using
    // any pack) or been published since. Look again right before deleting.
    if !doomed.packs.is_empty() {
        let unused = still_unused_packs(repo, &doomed.packs).await?;
        if unused.len() < doomed.packs.len() {
            tracing::info!(
                "keeping {} packs a backup started or published during this prune uses",
                doomed.packs.len() - unused.len()
            );
        }
        doomed.packs = unused;
    }
    delete_all(repo, &doomed.packs, lease).await?;
    for l in &doomed.leftovers {
        check(lease, &format!("delete {}", l.path.display()))?;
        repo.delete_leftover(l)?;
        tracing::debug!(
            "deleted {} (left by an interrupted write)",
            l.path.display()
        );
    }
    Ok(doomed)
}

fn check(lease: Option<&Lease<'_>>, action: &str) -> Result<()> {
    lease.map_or(Ok(()), |l| l.check(action))
}

/// The packs among `candidates` that no backup uses now: none in progress
/// (it may use any pack), and no manifest references them.
async fn still_unused_packs(
    repo: &Repository,
    candidates: &[(Key, u64)],
) -> Result<Vec<(Key, u64)>> {
    if let Some(b) = lock::live_backups(repo, true).await?.first() {
        tracing::info!("keeping every pack: {} is in progress", b.holder.describe());
        return Ok(vec![]);
    }
    let manifests = catalog::load_all(repo).await?;
    let referenced: HashSet<&str> = manifests
        .iter()
        .flat_map(|m| m.files.iter().flat_map(|f| f.chunks.iter()))
        .map(|c| c.pack.as_str())
        .collect();
    Ok(candidates
        .iter()
        .filter(|(k, _)| {
            k.filename()
                .and_then(|f| f.strip_suffix(".pack"))
                .is_some_and(|id| !referenced.contains(id))
        })
        .cloned()
        .collect())
}

async fn delete_all(
    repo: &Repository,
    keys: &[(Key, u64)],
    lease: Option<&Lease<'_>>,
) -> Result<()> {
    use futures::StreamExt;
    let mut deletions = futures::stream::iter(keys.iter().map(|(k, _)| async move {
        check(lease, &format!("delete {k}"))?;
        repo.delete(k).await?;
        tracing::debug!("deleted {k}");
        Ok::<_, Error>(())
    }))
    .buffer_unordered(8);
    while let Some(r) = deletions.next().await {
        r?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn repo(dir: &std::path::Path) -> Repository {
        Repository::open(&RepoUrl::Local(dir.to_path_buf()), true).unwrap()
    }

    async fn plant_packs(repo: &Repository, n: usize) -> Vec<(Key, u64)> {
        let mut keys = vec![];
        for i in 0..n {
            let key = Key::from(format!("{PACK_DIR}/{i:064x}.pack"));
            repo.put_replace(&key, Bytes::from_static(b"pack"))
                .await
                .unwrap();
            keys.push((key, 4));
        }
        keys
    }

    #[tokio::test]
    async fn a_prune_past_its_lease_deletes_nothing_more() {
        let d = tempfile::tempdir().unwrap();
        let repo = repo(d.path());
        let packs = plant_packs(&repo, 20).await;
        let lock = RepoLock::acquire(&repo, "prune").await.unwrap();
        // prune planned, then stalled until others may take the lock over.
        lock.lease().expire_now();
        let err = delete_all(&repo, &packs, Some(lock.lease()))
            .await
            .err()
            .unwrap();
        assert!(err.message().contains("refusing to delete"), "{err}");
        for (key, _) in &packs {
            assert!(repo.get(key).await.unwrap().is_some(), "{key} deleted");
        }
        lock.release().await.unwrap();
    }

    #[tokio::test]
    async fn packs_are_kept_when_a_backup_started_after_the_plan() {
        let d = tempfile::tempdir().unwrap();
        let repo = repo(d.path());
        let packs = plant_packs(&repo, 3).await;
        assert_eq!(still_unused_packs(&repo, &packs).await.unwrap(), packs);
        let marker = lock::write_marker(&repo, "0000000000000009").await.unwrap();
        assert!(still_unused_packs(&repo, &packs).await.unwrap().is_empty());
        lock::remove_marker(marker).await.unwrap();
    }

    // The whole plan in process, over a repository in memory.

    use crate::format::key::{pack_key, wal_key};
    use crate::format::manifest::{BackupStats, ChunkRef, FileEntry, chunks_sha256};
    use crate::format::object::{self, Sha256Digest};
    use crate::pg::lsn::Lsn;
    use crate::pg::wal::{SegmentName, WalFileName};
    use chrono::{DateTime, Utc};

    const SEG: u32 = 1 << 24;

    fn pack_id(n: u8) -> String {
        format!("{n:032x}")
    }

    /// A backup of `timeline` from segment `start` to inside segment
    /// `stop`, finished `hours_ago`, its one file's chunks in `packs`.
    fn manifest(
        timeline: u32,
        start: u64,
        stop: u64,
        hours_ago: i64,
        packs: &[u8],
        now: DateTime<Utc>,
    ) -> Manifest {
        let start_time = now - chrono::Duration::hours(hours_ago);
        let chunks: Vec<ChunkRef> = packs
            .iter()
            .map(|&p| ChunkRef {
                sha256: Sha256Digest::of(&[p]),
                size: 1,
                pack: pack_id(p),
                offset: 0,
                length: 1,
            })
            .collect();
        Manifest {
            format: 1,
            id: crate::format::manifest::backup_id(start_time),
            pg_version: 150000,
            system_identifier: "7712875144486048961".into(),
            wal_segment_size: SEG,
            timeline,
            start_lsn: Lsn(start * u64::from(SEG)),
            stop_lsn: Lsn(stop * u64::from(SEG) + 0x28),
            start_time,
            stop_time: start_time + chrono::Duration::minutes(5),
            backup_label: String::new(),
            tablespace_map: None,
            tablespaces: vec![],
            directories: vec![],
            files: vec![FileEntry {
                path: "base/1/1259".into(),
                size: chunks.len() as u64,
                mode: 0o600,
                mtime: start_time,
                chunks_sha256: chunks_sha256(&chunks),
                chunks,
            }],
            stats: BackupStats::default(),
        }
    }

    fn segment(timeline: u32, segno: u64) -> Key {
        wal_key(&WalFileName::Segment(SegmentName::of_segno(
            timeline, segno, SEG,
        )))
    }

    /// A cluster whose PITR copy was promoted to timeline 2 at segment 3
    /// and archives into the same repository: timeline 1 holds segments 1
    /// to 22 and backups at 2, 10 and 20; timeline 2 holds segments 3 to 9
    /// and the newest backup, at 6. The timeline-1 backup at 20 and the
    /// timeline-2 one share pack 0; pack 5 is referenced by nothing.
    async fn two_timelines() -> (Repository, Vec<Manifest>) {
        let repo = Repository::in_memory();
        let now = Utc::now();
        let backups = vec![
            manifest(1, 2, 3, 72, &[1], now),
            manifest(1, 10, 11, 48, &[2], now),
            manifest(1, 20, 21, 24, &[3, 0], now),
            manifest(2, 6, 7, 12, &[4, 0], now),
        ];
        for b in &backups {
            catalog::store(&repo, b).await.unwrap();
        }
        for (timeline, segnos) in [(1, 1..=22), (2, 3..=9)] {
            for segno in segnos {
                let key = segment(timeline, segno);
                repo.put_new(&key, Bytes::from_static(b"wal"))
                    .await
                    .unwrap();
            }
        }
        let (_, history) =
            object::encode(b"1\t0/3000000\tno recovery target specified\n", 3).unwrap();
        repo.put_new(
            &wal_key(&WalFileName::TimelineHistory(2)),
            Bytes::from(history),
        )
        .await
        .unwrap();
        for p in 0..=5 {
            repo.put_new(&pack_key(&pack_id(p)), Bytes::from_static(b"pack"))
                .await
                .unwrap();
        }
        (repo, backups)
    }

    fn options(keep_last: usize, dry_run: bool) -> PruneOptions {
        PruneOptions {
            policy: Policy {
                keep_last: Some(keep_last),
                ..Default::default()
            },
            dry_run,
            quiet: true,
        }
    }

    fn names(keys: &[(Key, u64)]) -> Vec<String> {
        let mut names: Vec<String> = keys.iter().map(|(k, _)| k.to_string()).collect();
        names.sort();
        names
    }

    fn segments(ranges: &[(u32, std::ops::RangeInclusive<u64>)]) -> Vec<String> {
        let mut names: Vec<String> = ranges
            .iter()
            .flat_map(|(t, r)| r.clone().map(|s| segment(*t, s).to_string()))
            .collect();
        names.sort();
        names
    }

    fn packs(ids: &[u8]) -> Vec<String> {
        let mut names: Vec<String> = ids
            .iter()
            .map(|&p| pack_key(&pack_id(p)).to_string())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn keep_last_1_plans_away_the_other_timeline_and_its_packs() {
        let (repo, backups) = two_timelines().await;
        let before = repo.list("").await.unwrap().len();
        let doomed = prune(&repo, SEG, &options(1, true), None, None)
            .await
            .unwrap();
        let ids: Vec<&str> = doomed.backups.iter().map(|b| b.0.as_str()).collect();
        let older: Vec<&str> = backups[..3].iter().map(|b| b.id.as_str()).collect();
        assert_eq!(ids, older);
        for (id, key, size) in &doomed.backups {
            assert_eq!(*key, manifest_key(id));
            assert!(*size > 0, "{key} has no size");
        }
        // The newest backup is on timeline 2 from segment 6: nothing of
        // timeline 1 (its ancestor, not its descendant) is needed.
        assert_eq!(names(&doomed.wal), segments(&[(1, 1..=22), (2, 3..=5)]));
        assert_eq!(names(&doomed.packs), packs(&[1, 2, 3, 5]));
        assert_eq!(doomed.packs_kept_because, None);
        assert!(doomed.leftovers.is_empty());
        // A dry run changes nothing.
        assert_eq!(repo.list("").await.unwrap().len(), before);
        assert_eq!(
            crate::repository::retention::load(&repo).await.unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn keep_last_2_keeps_each_timeline_from_its_backup_on_and_deletes_the_rest() {
        let (repo, backups) = two_timelines().await;
        let doomed = prune(&repo, SEG, &options(2, false), None, None)
            .await
            .unwrap();
        let ids: Vec<&str> = doomed.backups.iter().map(|b| b.0.as_str()).collect();
        assert_eq!(ids, [backups[0].id.as_str(), backups[1].id.as_str()]);
        assert_eq!(names(&doomed.wal), segments(&[(1, 1..=19), (2, 3..=5)]));
        assert_eq!(names(&doomed.packs), packs(&[1, 2, 5]));
        // What is left is exactly the rest, the history file included.
        let mut left: Vec<String> = repo
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key.to_string())
            .filter(|k| k.as_str() != crate::format::key::RETENTION_KEY)
            .collect();
        left.sort();
        let mut expected = segments(&[(1, 20..=22), (2, 6..=9)]);
        expected.extend(packs(&[0, 3, 4]));
        expected.push(manifest_key(&backups[2].id).to_string());
        expected.push(manifest_key(&backups[3].id).to_string());
        expected.push(wal_key(&WalFileName::TimelineHistory(2)).to_string());
        expected.sort();
        assert_eq!(left, expected);
        let kept: Vec<String> = catalog::load_all(&repo)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(kept, [backups[2].id.clone(), backups[3].id.clone()]);
        // retention.json says where each timeline's WAL is complete from.
        let record = crate::repository::retention::load(&repo)
            .await
            .unwrap()
            .unwrap();
        assert!(record.is_complete_from(1, 20));
        assert!(!record.is_complete_from(1, 19));
        assert!(record.is_complete_from(2, 6));
        assert!(!record.is_complete_from(2, 5));
        // A second prune finds nothing more to do.
        let again = prune(&repo, SEG, &options(2, true), None, None)
            .await
            .unwrap();
        assert!(again.backups.is_empty() && again.wal.is_empty() && again.packs.is_empty());
    }

    #[tokio::test]
    async fn a_backup_in_progress_keeps_every_pack_and_its_wal() {
        let (repo, backups) = two_timelines().await;
        // A backup of the timeline-2 copy started at segment 4.
        let marker = lock::write_marker(&repo, "0000000000000007").await.unwrap();
        marker
            .record_wal_start(2, Lsn(4 * u64::from(SEG) + 0x28))
            .await
            .unwrap();
        let doomed = prune(&repo, SEG, &options(1, true), None, None)
            .await
            .unwrap();
        assert_eq!(doomed.backups.len(), 3);
        assert_eq!(doomed.backups[2].0, backups[2].id);
        assert_eq!(names(&doomed.wal), segments(&[(1, 1..=22), (2, 3..=3)]));
        assert!(doomed.packs.is_empty());
        let why = doomed.packs_kept_because.unwrap();
        assert!(why.contains("backup 0000000000000007"), "{why}");
        lock::remove_marker(marker).await.unwrap();
    }
}
