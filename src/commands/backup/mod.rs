//! `walvault backup`: an online base backup through PostgreSQL's low-level API.
//!
//! Orchestration only: `pg` talks to the server, `walk` decides what to copy,
//! `copy` stores one file; this module runs them in order and in parallel.

mod copy;
mod upload;
use crate::pg::client as pg;
mod walk;

pub use crate::human::human_bytes;
use pg::connection_config;

use crate::error::{Error, Result};
use crate::format::manifest::{BackupStats, MANIFEST_FORMAT, Manifest, backup_id};
use crate::format::pack::{BlobIndex, PackWriter};
use crate::pg::lsn::Lsn;
use crate::repository::catalog;
use crate::repository::lock::{self, RepoLock};
use crate::repository::{RepoUrl, Repository, RepositoryConfig};
use clap::builder::TypedValueParser as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use upload::upload_packs;

// The doc comments are `walvault backup --help`.
#[derive(clap::Args)]
pub struct BackupOptions {
    /// Data directory (default: asked from the server).
    #[arg(long, env = "PGDATA")]
    pub pgdata: Option<PathBuf>,
    /// Connection string or URL (default: PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD).
    #[arg(long, env = "WALVAULT_DBNAME", hide_env_values = true)]
    pub dbname: Option<String>,
    /// Files copied in parallel (default: the number of cores).
    #[arg(long, env = "WALVAULT_JOBS")]
    pub jobs: Option<usize>,
    /// zstd level (1-19).
    #[arg(long, env = "WALVAULT_COMPRESS_LEVEL", default_value_t = 3,
          value_parser = clap::value_parser!(i32).range(1..=19))]
    pub compress_level: i32,
    /// Seconds to wait for the backup's last WAL to be archived.
    // How long pg_backup_stop may wait.
    #[arg(long, env = "WALVAULT_ARCHIVE_TIMEOUT", default_value = "300",
          value_parser = clap::value_parser!(u64).map(std::time::Duration::from_secs))]
    pub archive_timeout: std::time::Duration,
}

/// Packs are cut at this size: few requests, bounded memory.
const PACK_SIZE: usize = 16 << 20;

pub async fn run(url: &RepoUrl, opts: &BackupOptions) -> Result<()> {
    let started = Instant::now();
    let server = pg::Server::connect(&connection_config(opts.dbname.as_deref())?).await?;
    let pgdata = match (&opts.pgdata, &server.info.data_directory) {
        (Some(p), _) => p.clone(),
        (None, Some(d)) => PathBuf::from(d),
        (None, None) => {
            return Err(Error::usage(
                "cannot tell where the data directory is: give --pgdata (or PGDATA)",
            ));
        }
    };
    check_data_directory(&pgdata, &server.info.system_identifier)?;
    let root_repo = Repository::open(url, true)?;
    let root = root_repo
        .bind_cluster(&RepositoryConfig {
            format: crate::repository::ONE_CLUSTER_FORMAT,
            system_identifier: server.info.system_identifier.clone(),
            pg_version: server.info.version_num / 10000,
            wal_segment_size: server.info.wal_segment_size,
            created_at: chrono::Utc::now(),
            upgrades: Vec::new(),
        })
        .await?;
    // After an upgrade, the current cluster's objects are in its folder.
    let repo = root_repo.view(root.current_namespace());
    // Microseconds, PostgreSQL's precision: a time target printed from these
    // must not land a fraction before them.
    let start_time = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 6);
    let id = backup_id(start_time);
    // Registered under the lock, so a prune either sees this backup in
    // progress (and keeps every pack) or is over before we read the index.
    let lock =
        RepoLock::acquire_within(&repo, &format!("backup {id} start"), LOCK_WAIT, false).await?;
    let registered = lock::write_marker(&repo, &id).await;
    lock.release().await?;
    let marker = registered?;
    // The marker's lease is renewed while the backup runs: prune keeps every
    // pack of a backup that is alive, wherever (and in whatever pid namespace) it runs.
    let result = marker
        .keep_while(
            &format!("backup {id}"),
            take(&repo, &server, &pgdata, &id, start_time, opts, &marker),
        )
        .await;
    let unregistered = lock::remove_marker(marker).await;
    let manifest = result?;
    if let Err(e) = unregistered {
        // Published already: a leftover marker only makes prune keep packs.
        tracing::warn!("backup {id} is stored, but its in-progress marker stays: {e}");
    }
    print_summary(&manifest, started)
}

/// The data directory must be the connected server's: its pg_control starts
/// with the system identifier.
fn check_data_directory(pgdata: &std::path::Path, system_identifier: &str) -> Result<()> {
    let control = pgdata.join("global/pg_control");
    let bytes = std::fs::read(&control).map_err(|e| {
        Error::usage(format!(
            "cannot read {} ({e}); check --pgdata",
            control.display()
        ))
    })?;
    let on_disk = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")).to_string())
        .unwrap_or_default();
    if on_disk != system_identifier {
        return Err(Error::usage(format!(
            "{} belongs to cluster {on_disk}, but the server connected to is cluster {system_identifier}; \
             --pgdata and the connection must name the same server",
            pgdata.display()
        )));
    }
    Ok(())
}

/// How long a backup waits for a prune to release the repository.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

async fn take(
    repo: &Repository,
    server: &pg::Server,
    pgdata: &std::path::Path,
    id: &str,
    start_time: chrono::DateTime<chrono::Utc>,
    opts: &BackupOptions,
    marker: &lock::Lease<'_>,
) -> Result<Manifest> {
    let previous = catalog::load_readable(repo).await?;
    // Blocking work runs off this task: the marker's lease is renewed by the
    // future this one is polled beside, and must not starve meanwhile.
    let index = Arc::new(blocking(move || Ok(BlobIndex::from_manifests(&previous))).await?);

    let start_lsn: Lsn = server
        .backup_start(&format!("walvault {id}"))
        .await?
        .parse()?;
    tracing::info!("backup {id} started at LSN {start_lsn}");
    // From now on a prune keeps this backup's WAL, not just its packs.
    let start_timeline = server.checkpoint_timeline().await?;
    marker.record_wal_start(start_timeline, start_lsn).await?;

    let listing = {
        let pgdata = pgdata.to_path_buf();
        blocking(move || walk::list(&pgdata)).await?
    };
    let total: u64 = listing.files.iter().map(|f| f.size).sum();
    let progress = progress_bar(total);

    let (sealed_tx, sealed_rx) = tokio::sync::mpsc::channel(2);
    let seed = format!(
        "{id}/{}/{}/{:?}",
        lock::hostname(),
        std::process::id(),
        Instant::now()
    );
    let packs = Arc::new(PackWriter::new(PACK_SIZE, sealed_tx, index.clone(), seed));
    let stats = Arc::new(copy::CopyStats::default());
    let files = Arc::new(listing.files);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    let jobs = opts.jobs.unwrap_or_else(crate::commands::cores).max(1);
    let mut workers = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let (files, next, index, packs, stats, progress) = (
            files.clone(),
            next.clone(),
            index.clone(),
            packs.clone(),
            stats.clone(),
            progress.clone(),
        );
        let level = opts.compress_level;
        workers.push(tokio::task::spawn_blocking(move || {
            let ctx = copy::CopyContext {
                index: &index,
                packs: &packs,
                level,
                stats: &stats,
                progress: &progress,
            };
            let mut done = vec![];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(src) = files.get(i) else { break };
                if let Some(entry) = copy::copy_file(src, &ctx)? {
                    done.push(entry);
                }
            }
            Ok::<_, Error>(done)
        }));
    }
    let uploader = upload_packs(repo, sealed_rx, 2);
    let copying = async {
        let mut entries = vec![];
        for w in workers {
            entries.extend(
                w.await
                    .map_err(|e| Error::io(format!("backup worker failed: {e}")))??,
            );
        }
        packs.finish().await?;
        drop(packs);
        Ok::<_, Error>(entries)
    };
    // The uploader ends when every PackWriter handle (and so the sender) is gone.
    let (mut entries, uploaded) = tokio::try_join!(copying, uploader)?;
    progress.finish_and_clear();
    entries.sort_by(|a, b| a.path.cmp(&b.path));

    let archive_deadline = tokio::time::Instant::now() + opts.archive_timeout;
    let stop = tokio::time::timeout(opts.archive_timeout, server.backup_stop())
        .await
        .map_err(|_| {
            Error::io(format!(
                "the WAL this backup needs was not archived within {} s; check archive_command and \
                 pg_stat_archiver, then run the backup again (this one is abandoned)",
                opts.archive_timeout.as_secs()
            ))
        })??;
    let stop_time = chrono::SubsecRound::round_subsecs(chrono::Utc::now(), 6);
    let stop_lsn: Lsn = stop.lsn.parse()?;
    let timeline = pg::timeline_from_label(&stop.backup_label).ok_or_else(|| {
        Error::io("backup_label returned by the server has no START TIMELINE line")
    })?;
    wait_for_wal_in_repository(
        repo,
        id,
        timeline,
        (start_lsn, stop_lsn),
        server.info.wal_segment_size,
        archive_deadline,
        opts.archive_timeout,
    )
    .await?;
    let size: u64 = entries.iter().map(|e| e.size).sum();
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        id: id.to_string(),
        pg_version: server.info.version_num,
        system_identifier: server.info.system_identifier.clone(),
        wal_segment_size: server.info.wal_segment_size,
        timeline,
        start_lsn,
        stop_lsn,
        start_time,
        stop_time,
        backup_label: stop.backup_label,
        tablespace_map: stop.tablespace_map,
        tablespaces: listing.tablespaces,
        directories: listing.directories,
        files: entries,
        stats: BackupStats {
            size,
            stored: uploaded,
            deduplicated: stats.deduplicated.load(Ordering::Relaxed),
        },
    };
    // Publish under the lock: a prune never sees half of this step. A prune
    // that is alive (renewing its lease) is waited for however long it takes:
    // the backup is done and must not be thrown away.
    let lock =
        RepoLock::acquire_within(repo, &format!("backup {id} finish"), LOCK_WAIT, true).await?;
    let published = lock
        .hold(publish(repo, &manifest, marker, lock.lease()))
        .await;
    lock.release().await?;
    published?;
    Ok(manifest)
}

/// Runs blocking work on a blocking thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::io(format!("backup worker failed: {e}")))?
}

/// Waits (until `deadline`) for every WAL segment from the backup's start to
/// its stop to be in this repository: without them the backup cannot be
/// restored. PostgreSQL's own wait covers only its archiver, and with
/// archiving off, on a standby, or with archive_command pointing at another
/// repository it returns at once with a mere notice.
async fn wait_for_wal_in_repository(
    repo: &Repository,
    id: &str,
    timeline: u32,
    (start, stop): (Lsn, Lsn),
    segment_size: u32,
    deadline: tokio::time::Instant,
    timeout: std::time::Duration,
) -> Result<()> {
    loop {
        let Some(first_missing) = missing_wal(repo, timeline, (start, stop), segment_size).await?
        else {
            return Ok(());
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::io(format!(
                "WAL segment {first_missing} (backup {id} needs {start} to {stop}) is not in {} \
                 after {} s, so the backup could not be restored; the server must archive into \
                 this repository: check archive_mode = on (always on a standby), archive_command = \
                 'walvault --repo {} push %p %f' and pg_stat_archiver; backup {id} is not published",
                repo.url(),
                timeout.as_secs(),
                repo.url()
            )));
        }
        tracing::debug!("waiting for WAL segment {first_missing} to reach the repository");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// The first WAL segment from `start` to `stop` on `timeline` that is not in
/// the repository, if any.
async fn missing_wal(
    repo: &Repository,
    timeline: u32,
    (start, stop): (Lsn, Lsn),
    segment_size: u32,
) -> Result<Option<crate::pg::wal::SegmentName>> {
    use crate::format::key::wal_name_of_key;
    use crate::pg::wal::{SegmentName, WalFileName};
    // A stop LSN on a segment boundary (a standby's backup ending just after
    // a WAL switch) still needs the segment starting there: recovery must
    // read the record at the stop LSN before it can stop consistent.
    let mut missing: Vec<SegmentName> = start
        .segnos_through(stop, segment_size)
        .map(|segno| SegmentName::of_segno(timeline, segno, segment_size))
        .collect();
    let folders: std::collections::BTreeSet<String> = missing
        .iter()
        .map(|s| {
            format!(
                "{}/{:08X}{:08X}",
                crate::format::key::WAL_DIR,
                s.timeline,
                s.log
            )
        })
        .collect();
    let mut present = std::collections::HashSet::new();
    for folder in folders {
        for meta in repo.list(&folder).await? {
            if let Some(WalFileName::Segment(s)) = wal_name_of_key(&meta.key) {
                present.insert(s);
            }
        }
    }
    missing.retain(|s| !present.contains(s));
    Ok(missing.into_iter().next())
}

/// Stores the manifest, but only if nothing this backup relies on was taken
/// away: its marker must still be its own (so no prune judged it dead) and
/// every pack the manifest points into must exist. Both leases (the marker's
/// and the lock's) must be well within their terms as the manifest is stored.
async fn publish(
    repo: &Repository,
    manifest: &Manifest,
    marker: &lock::Lease<'_>,
    lock: &lock::Lease<'_>,
) -> Result<()> {
    let id = &manifest.id;
    if !marker.still_ours().await? {
        return Err(Error::conflict(format!(
            "backup {id} was judged dead by another walvault while it ran (its in-progress \
             marker is gone from {}), so packs it uses may be deleted; it is not published: \
             run the backup again",
            repo.url()
        )));
    }
    let stored: std::collections::HashSet<String> = repo
        .list(crate::format::key::PACK_DIR)
        .await?
        .iter()
        .filter_map(|m| m.key.filename()?.strip_suffix(".pack").map(String::from))
        .collect();
    let missing = manifest
        .files
        .iter()
        .flat_map(|f| f.chunks.iter().map(move |c| (f, c)))
        .find(|(_, c)| !stored.contains(&c.pack));
    if let Some((file, chunk)) = missing {
        return Err(Error::conflict(format!(
            "pack {} holding part of {} is missing from {} (deleted while the backup ran?); \
             backup {id} is not published: run the backup again",
            chunk.pack,
            file.path,
            repo.url()
        )));
    }
    // A prune that ran while we waited must not have taken our WAL.
    if let Some(gone) = missing_wal(
        repo,
        manifest.timeline,
        (manifest.start_lsn, manifest.stop_lsn),
        manifest.wal_segment_size,
    )
    .await?
    {
        return Err(Error::conflict(format!(
            "WAL segment {gone} that backup {id} needs is gone from {} (deleted while the \
             backup ran?); backup {id} is not published: run the backup again",
            repo.url()
        )));
    }
    let action = format!("publish backup {id}");
    marker.check(&action)?;
    lock.check(&action)?;
    catalog::store(repo, manifest).await
}

fn print_summary(manifest: &Manifest, started: Instant) -> Result<()> {
    let secs = started.elapsed().as_secs_f64();
    let size = manifest.stats.size;
    crate::say!(
        "backup {}: {} files, {} read, {} stored ({:.1}% deduplicated), \
         LSN {} to {} on timeline {}, {:.1} s, {}/s",
        manifest.id,
        manifest.files.len(),
        human_bytes(size),
        human_bytes(manifest.stats.stored),
        if size > 0 {
            100.0 * manifest.stats.deduplicated as f64 / size as f64
        } else {
            0.0
        },
        manifest.start_lsn,
        manifest.stop_lsn,
        manifest.timeline,
        secs,
        human_bytes((size as f64 / secs.max(0.001)) as u64)
    );
    Ok(())
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {bytes}/{total_bytes} [{wide_bar}] {bytes_per_sec}, {eta} left",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn a_backup_whose_wal_was_deleted_while_it_ran_is_not_published() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repository::open(&RepoUrl::Local(d.path().to_path_buf()), true).unwrap();
        let seg = 1u32 << 20;
        let now = chrono::Utc::now();
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            id: backup_id(now),
            pg_version: 150000,
            system_identifier: "1".into(),
            wal_segment_size: seg,
            timeline: 2,
            start_lsn: Lsn(6 * u64::from(seg) + 40),
            stop_lsn: Lsn(7 * u64::from(seg) + 100),
            start_time: now,
            stop_time: now,
            backup_label: String::new(),
            tablespace_map: None,
            tablespaces: vec![],
            directories: vec![],
            files: vec![],
            stats: BackupStats::default(),
        };
        let marker = lock::write_marker(&repo, &manifest.id).await.unwrap();
        // Segment 6 is there, 7 was deleted by a prune while the backup ran.
        let six = crate::pg::wal::WalFileName::parse("000000020000000000000006").unwrap();
        repo.put_replace(
            &crate::format::key::wal_key(&six),
            Bytes::from_static(b"wal"),
        )
        .await
        .unwrap();
        let lock = RepoLock::acquire(&repo, "backup finish").await.unwrap();
        let err = publish(&repo, &manifest, &marker, lock.lease())
            .await
            .err()
            .unwrap();
        lock.release().await.unwrap();
        assert!(
            err.message()
                .contains("WAL segment 000000020000000000000007 that backup"),
            "{err}"
        );
        assert!(catalog::ids(&repo).await.unwrap().is_empty());
        lock::remove_marker(marker).await.unwrap();
    }
}
