//! `walvault verify`: read every object back and prove it, and prove the WAL
//! each backup needs is all there.

use crate::archive::WalArchive;
use crate::catalog;
use crate::commands::backup::human_bytes;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::object;
use crate::repository::{RepoUrl, Repository, manifest_key, pack_key, wal_key};
use crate::retention::{self, Retention};
use crate::wal::WalFileName;
use futures::StreamExt;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

pub struct VerifyOptions {
    pub backup: Option<String>,
    pub json: bool,
    pub jobs: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Problem {
    /// The object (repository key) that is missing or damaged.
    pub object: String,
    pub problem: String,
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
    sha256: crate::object::Sha256Digest,
    size: u64,
    needed_by: String,
}

pub async fn run(url: &RepoUrl, opts: &VerifyOptions) -> Result<()> {
    let repo = Repository::open(url, false)?;
    let config = repo.require_config().await?;
    let mut problems = BTreeSet::new();
    let mut checked = Checked::default();

    let mut ids = catalog::ids(&repo).await?;
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
        match catalog::load(&repo, id).await {
            Ok(m) => manifests.push(m),
            Err(e) => {
                problems.insert(Problem {
                    object: manifest_key(id).to_string(),
                    problem: e.to_string(),
                });
            }
        }
    }
    checked.backups = manifests.len();
    let archive = WalArchive::load(&repo, config.wal_segment_size).await?;
    let retention = match retention::load(&repo).await {
        Ok(r) => r,
        Err(e) => {
            problems.insert(Problem {
                object: retention::RETENTION_KEY.into(),
                problem: e.to_string(),
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
                }),
                Ok(None) => Some(Problem {
                    object: key.to_string(),
                    problem: format!("{name} vanished during verify"),
                }),
                Err(e) => Some(Problem {
                    object: key.to_string(),
                    problem: e.to_string(),
                }),
            }
        }
    }))
    .buffer_unordered(opts.jobs.max(1))
    .collect()
    .await;
    checked.wal_files = wanted_wal.len();
    problems.extend(wal_results.into_iter().flatten());

    // Every blob of every manifest, one pack download each.
    let mut packs: BTreeMap<String, BTreeMap<u64, BlobRef>> = BTreeMap::new();
    for m in &manifests {
        for f in &m.files {
            let sum: u64 = f.chunks.iter().map(|c| c.size).sum();
            if sum != f.size {
                problems.insert(Problem {
                    object: manifest_key(&m.id).to_string(),
                    problem: format!(
                        "{}: chunks add up to {sum} bytes, the file has {}",
                        f.path, f.size
                    ),
                });
            }
            for c in &f.chunks {
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
        .buffer_unordered(opts.jobs.max(1))
        .collect()
        .await;
    for (bytes, found) in pack_results {
        checked.bytes += bytes;
        problems.extend(found);
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

/// Checks that the WAL each backup needs is present, reporting gaps, and
/// returns the WAL files to read.
fn continuity(
    archive: &WalArchive,
    manifests: &[Manifest],
    retention: Option<&Retention>,
    one_backup: bool,
    problems: &mut BTreeSet<Problem>,
) -> Vec<WalFileName> {
    let size = archive.segment_size;
    let mut wanted: BTreeSet<(u32, u64)> = BTreeSet::new();
    let missing = |timeline: u32, segno: u64, why: String, problems: &mut BTreeSet<Problem>| {
        let name = WalFileName::Segment(archive.segment_name(timeline, segno));
        problems.insert(Problem {
            object: wal_key(&name).to_string(),
            problem: format!("missing WAL segment {name}, {why}"),
        });
    };
    for m in manifests {
        let start = m.start_lsn.0 / u64::from(size);
        let stop = m.stop_lsn.0 / u64::from(size);
        let segs = archive.segments.get(&m.timeline);
        for segno in start..=stop {
            if segs.is_some_and(|s| s.contains_key(&segno)) {
                wanted.insert((m.timeline, segno));
            } else {
                missing(
                    m.timeline,
                    segno,
                    format!("needed by backup {} to become consistent", m.id),
                    problems,
                );
            }
        }
        // WAL trimmed on purpose by `prune --keep-wal-within` is not a gap.
        let complete = retention.is_none_or(|r| start >= r.complete_from_segno);
        if !complete {
            continue;
        }
        for (&timeline, segs) in &archive.segments {
            let Some(switch) = archive.descends_from(timeline, m.timeline) else {
                continue;
            };
            let from = if timeline == m.timeline {
                start
            } else {
                (switch / u64::from(size)).max(start)
            };
            let Some(&last) = segs.keys().next_back() else {
                continue;
            };
            for segno in from..=last {
                if segs.contains_key(&segno) {
                    wanted.insert((timeline, segno));
                } else {
                    missing(
                        timeline,
                        segno,
                        format!("needed to recover past it from backup {}", m.id),
                        problems,
                    );
                }
            }
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

async fn check_pack(
    repo: &Repository,
    id: &str,
    blobs: &BTreeMap<u64, BlobRef>,
) -> (u64, Vec<Problem>) {
    let key = pack_key(id);
    let problem = |p: String| Problem {
        object: key.to_string(),
        problem: p,
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
