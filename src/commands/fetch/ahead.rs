//! The prefetch worker (`walvault fetch-ahead`): fetches the segments after
//! the one recovery was just given into the spool, a bounded few at a time.

use super::file::{decode_streamed, limit_for};
use super::{CLAIM_WAIT, PREFETCH_MAX};
use crate::ahead::spool::{RepoBinding, Spool, WorkerKind};
use crate::error::{Error, Result};
use crate::format::key::wal_key;
use crate::format::object;
use crate::pg::wal::{SegmentName, WalFileName};
use crate::repository::{RepoUrl, Repository};
use futures::StreamExt;
use std::path::PathBuf;
use std::time::Instant;

// The doc comments are `walvault fetch-ahead --help`.
#[derive(clap::Args)]
pub struct AheadOptions {
    /// The segment recovery has just been given; the ones after it are fetched.
    pub after: String,
    #[arg(long)]
    pub spool: PathBuf,
    // How many of its successors to keep spooled.
    #[arg(long)]
    pub count: usize,
    #[arg(long)]
    pub segment_size: u32,
    /// The cluster whose WAL to fetch (see `walvault fetch --cluster`).
    #[arg(long)]
    pub cluster: Option<String>,
}

/// The prefetch worker (`walvault fetch-ahead`, started by fetch): downloads
/// the segments after `after` that are not spooled yet, in parallel, and
/// exits. Recovery meanwhile goes on replaying and calling fetch, which finds
/// them spooled, so replay and downloads overlap.
pub async fn run_ahead(url: &RepoUrl, opts: &AheadOptions) -> Result<()> {
    let WalFileName::Segment(after) =
        WalFileName::parse(&opts.after).map_err(|e| Error::usage(e.to_string()))?
    else {
        return Err(Error::usage(format!("{} is not a WAL segment", opts.after)));
    };
    let spool = Spool::at(&opts.spool);
    let Some(_lock) = spool.worker_lock(WorkerKind::Prefetch) else {
        return Ok(());
    };
    let started = Instant::now();
    let root_repo = Repository::open(url, false)?;
    // Copies are kept for this repository only (see `RepoBinding`).
    let Some(root) = root_repo.config().await? else {
        return Ok(());
    };
    let cluster = match &opts.cluster {
        Some(id) => root_repo.cluster(&root, id)?,
        None => root_repo.current(&root),
    };
    let (repo, binding) = (cluster.repo, RepoBinding::of(url, &cluster.config));
    spool.remember_repository(url, &root);
    let window = successors(after, opts.segment_size, opts.count.min(PREFETCH_MAX * 4));
    let have: Vec<WalFileName> = spool
        .prefetched(&binding)
        .into_iter()
        .map(|(n, _, _)| n)
        .collect();
    let wanted: Vec<WalFileName> = window
        .iter()
        .map(|s| WalFileName::Segment(*s))
        .filter(|n| !have.contains(n))
        .collect();
    spool.set_claims(WorkerKind::Prefetch, &binding, &wanted);
    // Downloads stuck on the store must not keep recovery waiting on claims.
    let got = tokio::time::timeout(CLAIM_WAIT, prefetch(&repo, &spool, &binding, &wanted))
        .await
        .unwrap_or_else(|_| {
            tracing::warn!(
                "prefetching took over {} s; recovery fetches the rest itself",
                CLAIM_WAIT.as_secs()
            );
            0
        });
    spool.set_claims(WorkerKind::Prefetch, &binding, &[]);
    tracing::info!(
        "prefetched {got} of {} segments after {} ({} ms)",
        wanted.len(),
        opts.after,
        started.elapsed().as_millis()
    );
    Ok(())
}

pub(super) fn successors(
    segment: SegmentName,
    segment_size: u32,
    count: usize,
) -> Vec<SegmentName> {
    std::iter::successors(Some(segment.next(segment_size)), |s| {
        Some(s.next(segment_size))
    })
    .take(count)
    .collect()
}

/// Downloads at once by the prefetch worker. Each streams its object into
/// its spool file, holding only the frames being decoded; so the worker's
/// memory is bounded by this, never by the window.
pub(super) const PREFETCH_PARALLEL: usize = 12;

/// Downloads, verifies and spools `wanted`, [`PREFETCH_PARALLEL`] at a
/// time; returns how many were spooled. Best effort: a segment missing or
/// failing here is fetched on demand. Each is decoded as it arrives
/// straight into its spool file, off the async thread.
pub(super) async fn prefetch(
    repo: &Repository,
    spool: &Spool,
    binding: &RepoBinding,
    wanted: &[WalFileName],
) -> usize {
    futures::stream::iter(wanted.iter().map(|name| async move {
        match prefetch_one(repo, spool, binding, *name).await {
            Ok(()) => true,
            Err(e) if e.kind == crate::error::ErrorKind::Corrupt => {
                tracing::warn!("{e}");
                false
            }
            Err(e) => {
                tracing::debug!("prefetch of {name} failed: {e}");
                false
            }
        }
    }))
    .buffer_unordered(PREFETCH_PARALLEL)
    .filter(|spooled| std::future::ready(*spooled))
    .count()
    .await
}

/// Downloads one object into the spool as it arrives, and proves it.
pub(super) async fn prefetch_one(
    repo: &Repository,
    spool: &Spool,
    binding: &RepoBinding,
    name: WalFileName,
) -> Result<()> {
    let Some(reader) = repo.open_object(&wal_key(&name)).await? else {
        return Err(Error::not_found(format!("{name} is not in the archive")));
    };
    let limit = limit_for(&name);
    let damaged = move |e: object::ObjectError| {
        Error::corrupt(format!(
            "{name} in the repository is damaged ({e}); not prefetched"
        ))
    };
    let size = reader.size();
    if size > object::max_stored_len(limit) {
        return Err(damaged(object::ObjectError::Corrupt(format!(
            "it is {size} bytes long, more than any object of at most {limit} bytes of content"
        ))));
    }
    let (spool, binding) = (Spool::at(spool.dir()), binding.clone());
    // Runs on a blocking thread, with `fill` delivering the object.
    let store = move |fill: &mut object::Fill<'_>| -> Result<()> {
        let mut buf = bytes::BytesMut::new();
        // The header names the spool file (by the content's sha256).
        while buf.len() < object::HEADER_LEN && fill(&mut buf).map_err(damaged)? > 0 {}
        let header = object::read_header_within(&buf, limit).map_err(damaged)?;
        spool.store_prefetched(&binding, &name, &header.sha256, |file| {
            match object::decode_to_file_from(buf, fill, file, limit, 1) {
                Ok(_) => Ok(()),
                Err(object::ObjectError::Write(e) | object::ObjectError::Internal(e)) => {
                    Err(Error::io(format!("cannot spool {name}: {e}")))
                }
                Err(object::ObjectError::Read(e)) => {
                    Err(Error::io(format!("cannot read {name}: {e}")))
                }
                Err(e) => Err(damaged(e)),
            }
        })
    };
    let task_failed = |e: tokio::task::JoinError| Error::io(format!("prefetch of {name}: {e}"));
    decode_streamed(reader, false, store)
        .await
        .map_err(task_failed)?
}
