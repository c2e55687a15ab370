//! `walvault push <path> <name>`: PostgreSQL's archive_command. This module
//! is the orchestration (the spool, the worker, the call PostgreSQL waits
//! for); `file` pushes one file, `ahead` is the push-ahead worker.

mod ahead;
mod file;

pub use ahead::{AheadOptions, run_ahead};
use file::{Pusher, cores, sha256_of_file, while_unchanged};

use crate::ahead::spool::{RepoBinding, Spool, WorkerKind};
use crate::error::{Context, Error, Result};
use crate::pg::wal::WalFileName;
use crate::repository::{RepoUrl, Repository};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

// The doc comments are `walvault push --help`.
#[derive(clap::Args)]
pub struct PushOptions {
    /// %p: path of the file, relative to the data directory.
    pub path: PathBuf,
    /// %f: its file name.
    pub name: String,
    /// zstd level (1-19).
    #[arg(long, env = "WALVAULT_COMPRESS_LEVEL", default_value_t = 3,
          value_parser = clap::value_parser!(i32).range(1..=19))]
    pub compress_level: i32,
    /// Push up to N other segments PostgreSQL has marked ready ahead of its calls, in a background worker (0: off).
    #[arg(long, env = "WALVAULT_PUSH_AHEAD", default_value_t = 16)]
    pub push_ahead: usize,
    /// Scratch directory for work done ahead (default: pg_wal/walvault-spool).
    #[arg(long, env = "WALVAULT_SPOOL")]
    pub spool: Option<PathBuf>,
}

/// How long a push waits for the background worker to finish a segment it
/// has claimed before pushing the segment itself.
pub(super) const CLAIM_WAIT: Duration = Duration::from_secs(120);

pub async fn run(url: &RepoUrl, opts: &PushOptions) -> Result<()> {
    let started = Instant::now();
    let name = WalFileName::parse(&opts.name).map_err(|e| Error::usage(e.to_string()))?;
    let spool = Spool::locate(opts.spool.as_deref(), &opts.path);
    // The repository there now: only records made for it prove anything.
    let config = match &spool {
        Some(_) => match Repository::open(url, false) {
            Ok(repo) => match repo.config().await {
                Ok(config) => config,
                // The store is unreachable: this push cannot succeed now, and
                // asking again below would spend the store client's whole
                // retry budget a second time before PostgreSQL hears of it.
                Err(e) if e.kind == crate::error::ErrorKind::Io => return Err(e),
                Err(_) => None,
            },
            Err(_) => None,
        },
        None => None,
    };
    let binding = config.as_ref().map(|c| RepoBinding::of(url, c));

    if let (Some(spool), Some(binding)) = (&spool, &binding) {
        wait_for_worker(spool, binding, &name).await;
        // Pushed ahead into this repository, and the file is still exactly
        // what was pushed then: nothing to do.
        if let Some(record) = spool.pushed(binding, &name) {
            spool.forget_pushed(binding, &name);
            let meta = std::fs::metadata(&opts.path)
                .context(|| format!("cannot read {}", opts.path.display()))?;
            let proof = if crate::ahead::spool::local_timestamps(&opts.path)
                && record.unchanged_by_metadata(&meta, std::time::SystemTime::now())
            {
                Some("by its metadata")
            } else {
                // Written too recently for its timestamps to prove anything.
                let (sha, meta) = while_unchanged(&opts.path, || sha256_of_file(&opts.path))?;
                meta.is_some_and(|m| record.matches(&m, &sha))
                    .then_some("by its sha256")
            };
            if let Some(proof) = proof {
                tracing::info!(
                    "{name} was archived ahead; verified unchanged {proof} ({} ms)",
                    started.elapsed().as_millis()
                );
                start_worker(spool, binding, url, opts, &name);
                return Ok(());
            }
            tracing::debug!("{name} changed since it was pushed ahead; pushing it again");
        }
    }

    let pusher = Pusher::new(url, opts.compress_level, config)?;
    let pushed = pusher.push(&name, &opts.path, cores()).await?;
    // Found already archived, identical: that was said, and nothing was stored.
    if !pushed.already {
        tracing::info!(
            "archived {name} ({} bytes, stored {} bytes, {} ms)",
            pushed.header.length,
            pushed.stored,
            started.elapsed().as_millis()
        );
    }
    if let (Some(spool), Some(binding)) = (&spool, pusher.binding()) {
        start_worker(spool, &binding, url, opts, &name);
    }
    Ok(())
}

/// If the background worker is pushing `name` right now, waits for it (a
/// few milliseconds, usually) rather than compressing the same bytes twice.
async fn wait_for_worker(spool: &Spool, binding: &RepoBinding, name: &WalFileName) {
    let since = Instant::now();
    while spool.pushed(binding, name).is_none()
        && since.elapsed() < CLAIM_WAIT
        && spool.claimed(WorkerKind::Push, binding, name)
        && spool.worker_running(WorkerKind::Push)
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Starts the push-ahead worker when other segments wait to be archived.
fn start_worker(
    spool: &Spool,
    binding: &RepoBinding,
    url: &RepoUrl,
    opts: &PushOptions,
    current: &WalFileName,
) {
    if opts.push_ahead == 0 || !matches!(current, WalFileName::Segment(_)) {
        return;
    }
    let Some(wal_dir) = opts.path.parent() else {
        return;
    };
    if spool.worker_running(WorkerKind::Push)
        || ready_segments(wal_dir, spool, binding, &HashSet::from([*current]), 1).is_empty()
    {
        return;
    }
    let wal_dir = std::path::absolute(wal_dir).unwrap_or_else(|_| wal_dir.to_path_buf());
    let args: Vec<std::ffi::OsString> = vec![
        "--push-ahead".into(),
        opts.push_ahead.to_string().into(),
        "--compress-level".into(),
        opts.compress_level.to_string().into(),
        // Still `.ready` until we exit: the worker must not push it again.
        "--skip".into(),
        current.to_string().into(),
        wal_dir.into(),
    ];
    crate::ahead::spawn_worker(spool, WorkerKind::Push, url, &args);
}

/// Segments PostgreSQL has marked `.ready` in `wal_dir` and that are neither
/// recorded as pushed into the repository `binding` nor in `skip`: the
/// oldest `limit` of them.
pub(super) fn ready_segments(
    wal_dir: &Path,
    spool: &Spool,
    binding: &RepoBinding,
    skip: &HashSet<WalFileName>,
    limit: usize,
) -> Vec<WalFileName> {
    let Ok(entries) = std::fs::read_dir(wal_dir.join("archive_status")) else {
        return vec![];
    };
    let mut ready: Vec<WalFileName> = entries
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().to_string();
            WalFileName::parse(file.strip_suffix(".ready")?).ok()
        })
        .filter(|n| {
            matches!(n, WalFileName::Segment(_))
                && !skip.contains(n)
                && spool.pushed(binding, n).is_none()
        })
        .collect();
    ready.sort_by_key(|n| n.to_string());
    ready.truncate(limit);
    ready
}
