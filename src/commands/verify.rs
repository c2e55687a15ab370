//! `walvault verify`: read every object back and prove it, and prove the WAL
//! each backup needs is all there.

use crate::error::{Error, Result};
use crate::format::key::{is_pack_id, manifest_key, pack_key, wal_key};
use crate::format::manifest::Manifest;
use crate::format::object;
use crate::human::human_bytes;
use crate::pg::wal::WalFileName;
use crate::repository::archive::WalArchive;
use crate::repository::catalog;
use crate::repository::retention::{self, Retention};
use crate::repository::{RepoUrl, Repository};
use futures::StreamExt;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

// The doc comments are `walvault verify --help`.
#[derive(clap::Args)]
pub struct VerifyOptions {
    /// Only this backup (its content and the WAL it needs).
    #[arg(long)]
    pub backup: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Objects read in parallel (default: four per core).
    #[arg(long, env = "WALVAULT_JOBS")]
    pub jobs: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Problem {
    /// The object (repository key) that is missing or damaged.
    pub object: String,
    pub problem: String,
    /// Missing WAL (rather than something damaged): judged afresh when the
    /// repository is listed again.
    #[serde(skip)]
    pub absent: bool,
}

#[derive(Default, Serialize)]
struct Checked {
    backups: usize,
    wal_files: usize,
    packs: usize,
    blobs: usize,
    bytes: u64,
}

/// One blob a manifest points at, and who needs it.
struct BlobRef {
    offset: u64,
    length: u64,
    sha256: crate::format::object::Sha256Digest,
    size: u64,
    needed_by: String,
}

pub async fn run(url: &RepoUrl, opts: &VerifyOptions) -> Result<()> {
    let root_repo = Repository::open(url, false)?;
    let root = root_repo.require_config().await?;
    // Every cluster of the repository (several after an upgrade), each in
    // its own objects; with --backup, the one that holds it.
    let mut clusters = root_repo.clusters(&root);
    if let Some(only) = &opts.backup {
        let Some(i) = catalog::holder_of(&clusters, only, "verify").await? else {
            return Err(Error::not_found(format!(
                "no backup {only}; 'walvault list' shows the backups"
            )));
        };
        clusters = vec![clusters.swap_remove(i)];
    }
    let mut problems = BTreeSet::new();
    let mut checked = Checked::default();
    for c in &clusters {
        let (seen, found) = verify_cluster(&c.repo, &c.config, c.current, opts).await?;
        checked.backups += seen.backups;
        checked.wal_files += seen.wal_files;
        checked.packs += seen.packs;
        checked.blobs += seen.blobs;
        checked.bytes += seen.bytes;
        problems.extend(found.into_iter().map(|mut p| {
            // Keys as the repository's root names them.
            if let Some(ns) = &c.namespace {
                p.object = format!("{ns}/{}", p.object);
            }
            p
        }));
    }

    report(&checked, &problems, opts.json)?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::corrupt(format!(
            "verify found {} problem(s) in {url}; each is listed above",
            problems.len()
        )))
    }
}

/// Verifies one cluster's objects (`repo` as that cluster sees the
/// repository): what was checked, and the problems found.
async fn verify_cluster(
    repo: &Repository,
    config: &crate::repository::RepositoryConfig,
    current: bool,
    opts: &VerifyOptions,
) -> Result<(Checked, BTreeSet<Problem>)> {
    let mut problems = BTreeSet::new();
    let mut checked = Checked::default();

    let mut ids = catalog::ids(repo).await?;
    if let Some(only) = &opts.backup {
        if !ids.contains(only) {
            return Err(Error::not_found(format!(
                "no backup {only}; 'walvault list' shows the backups"
            )));
        }
        ids.retain(|id| id == only);
    }
    let mut manifests = vec![];
    for id in &ids {
        match catalog::load(repo, id).await {
            Ok(m) => manifests.push(m),
            Err(e) => {
                problems.insert(Problem {
                    object: manifest_key(id).to_string(),
                    problem: e.to_string(),
                    absent: false,
                });
            }
        }
    }
    checked.backups = manifests.len();
    let archive = WalArchive::load(repo, config.wal_segment_size).await?;
    let retention = match retention::load(repo).await {
        Ok(r) => r,
        Err(e) => {
            problems.insert(Problem {
                object: crate::format::key::RETENTION_KEY.into(),
                problem: e.to_string(),
                absent: false,
            });
            None
        }
    };

    let wanted_wal = continuity(
        &archive,
        &manifests,
        retention.as_ref(),
        opts.backup.is_some(),
        &mut problems,
    );

    // Read every WAL object (or, for one backup, the ones it needs).
    let wal_results: Vec<Option<Problem>> = futures::stream::iter(wanted_wal.iter().map(|name| {
        let repo = &repo;
        async move {
            let key = wal_key(name);
            match repo.get(&key).await {
                Ok(Some(bytes)) => object::decode(&bytes).err().map(|e| Problem {
                    object: key.to_string(),
                    problem: format!("{name}: {e}"),
                    absent: false,
                }),
                Ok(None) => Some(Problem {
                    object: key.to_string(),
                    problem: format!("{name} vanished during verify"),
                    absent: true,
                }),
                Err(e) => Some(Problem {
                    object: key.to_string(),
                    problem: e.to_string(),
                    absent: false,
                }),
            }
        }
    }))
    .buffer_unordered(opts.jobs.unwrap_or(4 * crate::commands::cores()).max(1))
    .collect()
    .await;
    checked.wal_files = wanted_wal.len();
    problems.extend(wal_results.into_iter().flatten());

    // Every blob of every manifest, one pack download each.
    let mut packs: BTreeMap<String, BTreeMap<u64, BlobRef>> = BTreeMap::new();
    for m in &manifests {
        problems.extend(restorable(m));
        for f in &m.files {
            // A name that is no pack id is reported by `restorable`, and
            // never becomes a key.
            for c in f.chunks.iter().filter(|c| is_pack_id(&c.pack)) {
                packs
                    .entry(c.pack.clone())
                    .or_default()
                    .entry(c.offset)
                    .or_insert_with(|| BlobRef {
                        offset: c.offset,
                        length: c.length,
                        sha256: c.sha256,
                        size: c.size,
                        needed_by: format!("{} of backup {}", f.path, m.id),
                    });
            }
        }
    }
    checked.packs = packs.len();
    checked.blobs = packs.values().map(|b| b.len()).sum();
    let pack_results: Vec<(u64, Vec<Problem>)> =
        futures::stream::iter(packs.iter().map(|(id, blobs)| {
            let repo = &repo;
            async move { check_pack(repo, id, blobs).await }
        }))
        .buffer_unordered(opts.jobs.unwrap_or(4 * crate::commands::cores()).max(1))
        .collect()
        .await;
    for (bytes, found) in pack_results {
        checked.bytes += bytes;
        problems.extend(found);
    }

    // A prune running beside us deletes backups, then the WAL and packs only
    // they needed: what went missing since we listed counts only if the
    // repository, listed again now, still needs it. An archiver that pushes
    // ahead lands segments out of order, and on a busy host one upload (an
    // fsync behind a backup's writes) can lag the ones after it by seconds.
    // So the repository is listed again with growing pauses, for about half
    // a minute, and missing WAL counts only where every listing found it
    // missing (by the key of a run's first segment); a clean repository
    // never waits. A cluster that archives here no more has no archiver to
    // close a gap: it is listed again once, without pauses.
    if !problems.is_empty() {
        let first = problems;
        let mut missing_throughout = absent_keys(&first);
        let pauses: &[u64] = if current { &RECHECK_PAUSES } else { &[] };
        let mut pauses = pauses.iter();
        problems = loop {
            let mut now = recheck(
                repo,
                config.wal_segment_size,
                &manifests,
                opts.backup.is_some(),
                first.clone(),
            )
            .await?;
            keep_missing_throughout(&mut missing_throughout, &mut now);
            match pauses.next() {
                Some(&secs) if now.iter().any(|p| p.absent) => {
                    tokio::time::sleep(std::time::Duration::from_secs(secs)).await
                }
                _ => break now,
            }
        };
    }

    Ok((checked, problems))
}

/// The keys of the missing WAL among `problems`.
fn absent_keys(problems: &BTreeSet<Problem>) -> BTreeSet<String> {
    problems
        .iter()
        .filter(|p| p.absent)
        .map(|p| p.object.clone())
        .collect()
}

/// Narrows `throughout`, the missing WAL every listing so far found, by the
/// listing that found `now`, and leaves in `now` only that missing WAL.
fn keep_missing_throughout(throughout: &mut BTreeSet<String>, now: &mut BTreeSet<Problem>) {
    *throughout = &*throughout & &absent_keys(now);
    now.retain(|p| !p.absent || throughout.contains(&p.object));
}

/// The pauses, in seconds, between listings of the repository before
/// missing WAL counts.
const RECHECK_PAUSES: [u64; 5] = [1, 2, 4, 8, 15];

/// The problems that still stand against the repository as it is now:
/// damage to what remaining backups need, and the WAL they need that is
/// missing now (whatever was missing before).
async fn recheck(
    repo: &Repository,
    segment_size: u32,
    manifests: &[Manifest],
    one_backup: bool,
    problems: BTreeSet<Problem>,
) -> Result<BTreeSet<Problem>> {
    // The backups are listed after the WAL: a prune deletes a backup before
    // the WAL only it needed, so one of the backups read at the start that
    // is still there existed all the while the WAL was listed, and the
    // listing holds everything it needs unless that is truly gone.
    let archive = WalArchive::load(repo, segment_size).await?;
    let ids: BTreeSet<String> = catalog::ids(repo).await?.into_iter().collect();
    if one_backup && let Some(gone) = manifests.iter().find(|m| !ids.contains(&m.id)) {
        return Err(Error::not_found(format!(
            "backup {} was deleted while verify read it (a prune?); 'walvault list' shows the backups",
            gone.id
        )));
    }
    let present: Vec<Manifest> = manifests
        .iter()
        .filter(|m| ids.contains(&m.id))
        .cloned()
        .collect();
    let retention = retention::load(repo).await.ok().flatten();
    let mut needed_missing = BTreeSet::new();
    continuity(
        &archive,
        &present,
        retention.as_ref(),
        one_backup,
        &mut needed_missing,
    );
    needed_missing.retain(|p| p.absent);
    let now = Present {
        manifests: ids.iter().map(|id| manifest_key(id).to_string()).collect(),
        wal: archive
            .all_files()
            .map(|f| f.meta.key.to_string())
            .collect(),
        wal_needed_missing: needed_missing.iter().map(|p| p.object.clone()).collect(),
        packs: present
            .iter()
            .flat_map(|m| m.files.iter().flat_map(|f| &f.chunks))
            .filter(|c| is_pack_id(&c.pack))
            .map(|c| pack_key(&c.pack).to_string())
            .collect(),
    };
    Ok(problems
        .into_iter()
        .filter(|p| !p.absent && now.still_stands(p))
        .chain(needed_missing)
        .collect())
}

/// The repository as listed again after the checks.
#[derive(Default)]
struct Present {
    /// Keys of the manifests that exist.
    manifests: BTreeSet<String>,
    /// Keys of the WAL objects that exist.
    wal: BTreeSet<String>,
    /// Keys of WAL objects missing that a remaining backup needs.
    wal_needed_missing: BTreeSet<String>,
    /// Keys of the packs a remaining backup refers to.
    packs: BTreeSet<String>,
}

impl Present {
    /// A problem with an object a prune has since let go of (its backup is
    /// gone, or no remaining backup needs it) is no problem.
    fn still_stands(&self, p: &Problem) -> bool {
        let key = p.object.as_str();
        if key.starts_with(&format!("{}/", crate::format::key::BACKUP_DIR)) {
            self.manifests.contains(key)
        } else if key.starts_with(&format!("{}/", crate::format::key::PACK_DIR)) {
            self.packs.contains(key)
        } else if key.starts_with(&format!("{}/", crate::format::key::WAL_DIR)) {
            self.wal.contains(key) || self.wal_needed_missing.contains(key)
        } else {
            true
        }
    }
}

/// What restore would refuse in a manifest, or restore into a directory
/// PostgreSQL cannot start: verify passes only what restore would restore.
fn restorable(m: &Manifest) -> Vec<Problem> {
    let problem = |p: String| Problem {
        object: manifest_key(&m.id).to_string(),
        problem: p,
        absent: false,
    };
    let mut found = vec![];
    if let Err(e) = m.check_paths() {
        found.push(problem(e.to_string()));
    }
    if let Some(bad) = m
        .files
        .iter()
        .flat_map(|f| &f.chunks)
        .find(|c| !is_pack_id(&c.pack))
    {
        found.push(problem(format!(
            "backup {} refers to pack '{}', which is not a pack id; restore refuses it",
            m.id,
            bad.pack.escape_debug()
        )));
    }
    for f in &m.files {
        // Checked: the sizes are the manifest's to claim.
        let sum = f
            .chunks
            .iter()
            .try_fold(0u64, |sum, c| sum.checked_add(c.size));
        if sum != Some(f.size) {
            found.push(problem(format!(
                "{}: chunks add up to {} bytes, the file has {}",
                f.path,
                sum.map_or("more than 2^64".to_string(), |s| s.to_string()),
                f.size
            )));
        }
    }
    // Every data directory has these; without them PostgreSQL cannot start.
    for essential in ["PG_VERSION", "global/pg_control"] {
        if !m.files.iter().any(|f| f.path == essential) {
            found.push(problem(format!(
                "backup {} has no {essential} ({} files listed); a restore of it cannot start",
                m.id,
                m.files.len()
            )));
        }
    }
    if m.backup_label.trim().is_empty() {
        found.push(problem(format!(
            "backup {} has an empty backup_label; a restore of it cannot start recovery",
            m.id
        )));
    }
    found
}

/// Checks that the WAL each backup needs is present, reporting gaps, and
/// returns the WAL files to read. A backup needs its own timeline from its
/// start on, and the timelines that branch from it after its start (a restore
/// to `latest` follows them); LSNs of unrelated timelines are never compared.
fn continuity(
    archive: &WalArchive,
    manifests: &[Manifest],
    retention: Option<&Retention>,
    one_backup: bool,
    problems: &mut BTreeSet<Problem>,
) -> Vec<WalFileName> {
    use crate::recovery::continuity::{self, Purpose};
    let mut wanted: BTreeSet<(u32, u64)> = BTreeSet::new();
    // WAL trimmed on purpose by `prune --keep-wal-within` is not a gap.
    let complete_from =
        |timeline: u32, segno: u64| retention.is_none_or(|r| r.is_complete_from(timeline, segno));
    for m in manifests {
        if m.stop_lsn < m.start_lsn {
            problems.insert(Problem {
                object: manifest_key(&m.id).to_string(),
                problem: format!(
                    "backup {} stops at {} before it starts at {}",
                    m.id, m.stop_lsn, m.start_lsn
                ),
                absent: false,
            });
            continue;
        }
        for stretch in continuity::stretches(
            &archive.segments,
            &archive.ancestry,
            m.timeline,
            (m.start_lsn, m.stop_lsn),
            archive.segment_size,
            &complete_from,
        ) {
            // Walks what the listing holds, never the numbers in between: a
            // manifest may claim any range, and the work must stay bounded
            // by the listing.
            let walk = continuity::walk(
                archive.segments.get(&stretch.timeline),
                stretch.from,
                stretch.to,
            );
            if !walk.missing.is_empty() {
                let why = match stretch.purpose {
                    Purpose::Consistency => {
                        format!("needed by backup {} to become consistent", m.id)
                    }
                    Purpose::RecoverPast => {
                        format!("needed to recover past it from backup {}", m.id)
                    }
                };
                for run in walk.missing {
                    missing(
                        archive,
                        stretch.timeline,
                        *run.start(),
                        *run.end(),
                        &why,
                        problems,
                    );
                }
            }
            wanted.extend(walk.present.into_iter().map(|n| (stretch.timeline, n)));
        }
    }
    if one_backup {
        return wanted
            .into_iter()
            .map(|(t, s)| WalFileName::Segment(archive.segment_name(t, s)))
            .collect();
    }
    archive.all_files().map(|f| f.name).collect()
}

/// One problem per run of missing segments `first..=last`.
fn missing(
    archive: &WalArchive,
    timeline: u32,
    first: u64,
    last: u64,
    why: &str,
    problems: &mut BTreeSet<Problem>,
) {
    let name = WalFileName::Segment(archive.segment_name(timeline, first));
    let problem = if first == last {
        format!("missing WAL segment {name}, {why}")
    } else {
        format!(
            "missing WAL segment {name} and the {} after it, to {}, {why}",
            last - first,
            archive.segment_name(timeline, last)
        )
    };
    problems.insert(Problem {
        object: wal_key(&name).to_string(),
        problem,
        absent: true,
    });
}

async fn check_pack(
    repo: &Repository,
    id: &str,
    blobs: &BTreeMap<u64, BlobRef>,
) -> (u64, Vec<Problem>) {
    let key = pack_key(id);
    let problem = |p: String| Problem {
        object: key.to_string(),
        problem: p,
        absent: false,
    };
    let pack = match repo.get(&key).await {
        Ok(Some(p)) => p,
        Ok(None) => {
            let first = blobs
                .values()
                .next()
                .map(|b| b.needed_by.as_str())
                .unwrap_or("?");
            return (
                0,
                vec![problem(format!(
                    "pack is missing; needed by {first} and {} other blob(s)",
                    blobs.len() - 1
                ))],
            );
        }
        Err(e) => return (0, vec![problem(e.to_string())]),
    };
    let mut found = vec![];
    for b in blobs.values() {
        let end = b
            .offset
            .checked_add(b.length)
            .filter(|&e| e <= pack.len() as u64);
        let Some(end) = end else {
            found.push(problem(format!(
                "pack is {} bytes, {} needs bytes {}..+{}",
                pack.len(),
                b.needed_by,
                b.offset,
                b.length
            )));
            continue;
        };
        match object::decode_limited(&pack[b.offset as usize..end as usize], b.size) {
            Ok((h, data)) if h.sha256 == b.sha256 && data.len() as u64 == b.size => {}
            Ok((h, _)) => found.push(problem(format!(
                "blob at {} holds sha256 {}, {} expects {}",
                b.offset, h.sha256, b.needed_by, b.sha256
            ))),
            Err(e) => found.push(problem(format!(
                "blob at {} for {}: {e}",
                b.offset, b.needed_by
            ))),
        }
    }
    (pack.len() as u64, found)
}

fn report(checked: &Checked, problems: &BTreeSet<Problem>, json: bool) -> Result<()> {
    if json {
        let out = serde_json::json!({
            "ok": problems.is_empty(),
            "checked": checked,
            "problems": problems,
        });
        crate::say!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return Ok(());
    }
    for p in problems {
        crate::say!("PROBLEM {}: {}", p.object, p.problem);
    }
    crate::say!(
        "verify: {} backups, {} WAL files, {} packs ({} blobs, {}) checked; {}",
        checked.backups,
        checked.wal_files,
        checked.packs,
        checked.blobs,
        human_bytes(checked.bytes),
        if problems.is_empty() {
            "no problems".to_string()
        } else {
            format!("{} problem(s)", problems.len())
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::manifest::{BackupStats, ChunkRef, FileEntry};
    use crate::format::object::Sha256Digest;
    use crate::pg::lsn::Lsn;

    fn file(path: &str, pack: &str) -> FileEntry {
        FileEntry {
            path: path.into(),
            size: 1,
            mode: 0o600,
            mtime: chrono::Utc::now(),
            chunks_sha256: Sha256Digest([0; 32]),
            chunks: vec![ChunkRef {
                sha256: Sha256Digest([0; 32]),
                size: 1,
                pack: pack.into(),
                offset: 0,
                length: 1,
            }],
        }
    }

    fn manifest(files: Vec<FileEntry>) -> Manifest {
        Manifest {
            format: 1,
            id: "20261127T153444Z".into(),
            pg_version: 150000,
            system_identifier: "1".into(),
            wal_segment_size: 1 << 24,
            timeline: 1,
            start_lsn: Lsn(2 << 24),
            stop_lsn: Lsn(3 << 24),
            start_time: chrono::Utc::now(),
            stop_time: chrono::Utc::now(),
            backup_label: "START WAL LOCATION: 0/2000028\n".into(),
            tablespace_map: None,
            tablespaces: vec![],
            directories: vec![],
            files,
            stats: BackupStats::default(),
        }
    }

    const PACK: &str = "0123456789abcdef0123456789abcdef";

    /// An archiver that pushes ahead lands segments out of order: a gap
    /// verify saw that has closed when it lists again is no problem, one
    /// still open is.
    #[tokio::test]
    async fn missing_wal_is_judged_as_the_repository_is_listed_again() {
        use crate::pg::wal::SegmentName;
        let repo = Repository::in_memory();
        let m = manifest(vec![file("PG_VERSION", PACK)]);
        catalog::store(&repo, &m).await.unwrap();
        let segment = |segno: u64| {
            wal_key(&WalFileName::Segment(SegmentName::of_segno(
                1,
                segno,
                m.wal_segment_size,
            )))
        };
        for segno in [2, 3, 5] {
            repo.put_new(&segment(segno), bytes::Bytes::from_static(b"wal"))
                .await
                .unwrap();
        }
        let archive = WalArchive::load(&repo, m.wal_segment_size).await.unwrap();
        let manifests = [m.clone()];
        let mut first = BTreeSet::new();
        continuity(&archive, &manifests, None, false, &mut first);
        assert_eq!(
            first.iter().map(|p| p.object.clone()).collect::<Vec<_>>(),
            [segment(4).to_string()]
        );
        let again = recheck(&repo, m.wal_segment_size, &manifests, false, first.clone());
        assert_eq!(again.await.unwrap(), first);
        repo.put_new(&segment(4), bytes::Bytes::from_static(b"wal"))
            .await
            .unwrap();
        let again = recheck(&repo, m.wal_segment_size, &manifests, false, first);
        assert_eq!(again.await.unwrap(), BTreeSet::new());
    }

    /// Missing WAL counts only where every listing found it missing: a
    /// hole one listing caught for a moment, among others that closed, is
    /// no gap; damage is never dropped.
    #[test]
    fn missing_wal_counts_only_if_every_listing_found_it() {
        let problem = |object: &str, absent: bool| Problem {
            object: object.into(),
            problem: format!("{object} {absent}"),
            absent,
        };
        let first = BTreeSet::from([problem("wal/a", true), problem("wal/b", true)]);
        let mut throughout = absent_keys(&first);
        let mut now = BTreeSet::from([
            problem("wal/b", true),
            problem("wal/c", true),
            problem("packs/x", false),
        ]);
        keep_missing_throughout(&mut throughout, &mut now);
        assert_eq!(
            now,
            BTreeSet::from([problem("wal/b", true), problem("packs/x", false)])
        );
        let mut later = BTreeSet::from([problem("wal/c", true), problem("wal/a", true)]);
        keep_missing_throughout(&mut throughout, &mut later);
        assert_eq!(later, BTreeSet::new());
    }

    #[test]
    fn only_what_restore_would_restore_passes() {
        let good = || vec![file("PG_VERSION", PACK), file("global/pg_control", PACK)];
        assert_eq!(restorable(&manifest(good())), []);

        let mut escaping = good();
        escaping.push(file("../../etc/cron.d/x", PACK));
        let found = restorable(&manifest(escaping));
        assert!(
            found[0].problem.contains("leaves the data directory"),
            "{found:?}"
        );

        let found = restorable(&manifest(vec![]));
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0]
                .problem
                .contains("has no PG_VERSION (0 files listed)")
        );

        // A short pack id is reported, not sliced (it used to panic).
        let mut short = good();
        short.push(file("base/1/1", "a"));
        let found = restorable(&manifest(short));
        assert!(
            found[0]
                .problem
                .contains("pack 'a', which is not a pack id"),
            "{found:?}"
        );

        // Sizes that overflow when added are a problem, not a panic.
        let mut huge = good();
        let again = huge[0].chunks[0].clone();
        huge[0].chunks.push(again);
        huge[0].chunks[1].size = u64::MAX;
        let found = restorable(&manifest(huge));
        assert!(found[0].problem.contains("more than 2^64"), "{found:?}");

        let mut no_label = manifest(good());
        no_label.backup_label = String::new();
        assert_eq!(restorable(&no_label).len(), 1);
    }

    #[test]
    fn wal_ranges_a_manifest_claims_are_walked_by_the_listing() {
        let archive = WalArchive {
            segment_size: 1 << 24,
            ..Default::default()
        };
        let mut m = manifest(vec![]);
        m.start_lsn = Lsn(0);
        m.stop_lsn = Lsn(u64::MAX);
        let mut problems = BTreeSet::new();
        let started = std::time::Instant::now();
        continuity(&archive, &[m.clone()], None, true, &mut problems);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let p: Vec<&str> = problems.iter().map(|p| p.problem.as_str()).collect();
        assert_eq!(
            p,
            [
                "missing WAL segment 000000010000000000000000 and the 1099511627775 after it, to 00000001FFFFFFFF000000FF, needed by backup 20261127T153444Z to become consistent"
            ]
        );

        m.stop_lsn = Lsn(1);
        m.start_lsn = Lsn(5 << 24);
        let mut problems = BTreeSet::new();
        continuity(&archive, &[m], None, true, &mut problems);
        assert!(
            problems
                .iter()
                .next()
                .unwrap()
                .problem
                .contains("stops at 0/1 before it starts"),
            "{problems:?}"
        );
    }

    /// An archive of 16 MiB segments holding just `name` on timeline 1.
    fn one_segment_archive(name: &str) -> WalArchive {
        let mut archive = WalArchive {
            segment_size: 1 << 24,
            ..Default::default()
        };
        let name = WalFileName::parse(name).unwrap();
        let segno = name.segment_with_header().unwrap().segno(1 << 24);
        archive.segments.entry(1).or_default().insert(
            segno,
            crate::repository::archive::ArchivedFile {
                name,
                meta: crate::repository::ObjectInfo {
                    key: name.to_string().as_str().into(),
                    last_modified: chrono::Utc::now(),
                    size: 0,
                },
            },
        );
        archive
    }

    #[test]
    fn a_stop_on_a_segment_boundary_needs_no_segment_after_it() {
        let archive = one_segment_archive("000000010000000000000002");
        // Starts in segment 2, stops exactly where segment 3 begins.
        let m = manifest(vec![]);
        assert_eq!(m.stop_lsn, Lsn(3 << 24));
        let mut problems = BTreeSet::new();
        continuity(&archive, &[m], None, true, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn a_backup_past_the_end_of_its_timelines_wal_is_a_gap_not_a_panic() {
        let archive = one_segment_archive("000000010000000000000001");
        // Starts in segment 2, after the last segment listed (1): walking
        // "from 2 to the end of the timeline" used to panic on 2..=1.
        let mut problems = BTreeSet::new();
        continuity(&archive, &[manifest(vec![])], None, true, &mut problems);
        let p: Vec<&str> = problems.iter().map(|p| p.problem.as_str()).collect();
        assert_eq!(
            p,
            [
                "missing WAL segment 000000010000000000000002, needed by backup 20261127T153444Z to become consistent"
            ]
        );
    }

    #[test]
    fn what_a_prune_let_go_of_is_no_problem() {
        let gone_backup = manifest_key("20261101T000000Z").to_string();
        let kept_backup = manifest_key("20261127T153444Z").to_string();
        let gone_pack = pack_key("ffffffffffffffffffffffffffffffff").to_string();
        let kept_pack = pack_key(PACK).to_string();
        let wal = |n: &str| format!("wal/{}/{n}.zst", &n[..16]);
        let now = Present {
            manifests: [kept_backup.clone()].into(),
            wal: [wal("000000010000000000000005")].into(),
            wal_needed_missing: [wal("000000010000000000000006")].into(),
            packs: [kept_pack.clone()].into(),
        };
        let p = |object: &str| Problem {
            object: object.into(),
            problem: "x".into(),
            absent: false,
        };
        // Deleted by prune with the backups that needed them.
        assert!(!now.still_stands(&p(&gone_backup)));
        assert!(!now.still_stands(&p(&gone_pack)));
        assert!(!now.still_stands(&p(&wal("000000010000000000000001"))));
        // Still needed, or still there and damaged: problems.
        assert!(now.still_stands(&p(&kept_backup)));
        assert!(now.still_stands(&p(&kept_pack)));
        assert!(now.still_stands(&p(&wal("000000010000000000000005"))));
        assert!(now.still_stands(&p(&wal("000000010000000000000006"))));
        assert!(now.still_stands(&p(crate::format::key::RETENTION_KEY)));
    }
}
