//! The push-ahead worker (`walvault push-ahead`): pushes `.ready` segments
//! before PostgreSQL asks, and records each one in the spool once durable.

use super::file::{Pusher, cores};
use super::ready_segments;
use crate::ahead::spool::{FileIdentity, RepoBinding, Spool, WorkerKind};
use crate::error::Result;
use crate::pg::wal::WalFileName;
use crate::repository::RepoUrl;
use futures::StreamExt;
use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

// The doc comments are `walvault push-ahead --help`.
#[derive(clap::Args)]
pub struct AheadOptions {
    /// pg_wal of the cluster.
    // Its archive_status says what is ready.
    pub wal_dir: PathBuf,
    #[arg(long)]
    pub spool: PathBuf,
    // The most segments claimed at once (two per core are pushed at once).
    #[arg(long)]
    pub push_ahead: usize,
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub compress_level: i32,
    /// A segment not to push (its own push just did).
    #[arg(long)]
    pub skip: Option<String>,
}

/// A worker takes on new rounds for this long; the next push starts another.
const WORKER_LIFETIME: Duration = Duration::from_secs(600);
/// The most the worker waits for any of its pushes to finish (shorter than
/// [`CLAIM_WAIT`]).
const PUSH_LIMIT: Duration = Duration::from_secs(100);

/// The push-ahead worker (`walvault push-ahead`, started by push): pushes
/// `.ready` segments, oldest first, recording each in the spool once it is
/// durable, until none is left. While it works PostgreSQL's archiver goes on
/// calling push, which finds the records, so archiving and pushing overlap.
/// Failures here are only logged: PostgreSQL's own call pushes that segment
/// and reports the error.
pub async fn run_ahead(url: &RepoUrl, opts: &AheadOptions) -> Result<()> {
    let spool = Spool::at(&opts.spool);
    let Some(_lock) = spool.worker_lock(WorkerKind::Push) else {
        return Ok(());
    };
    let pusher = Pusher::new(url, opts.compress_level, None)?;
    // The repository this worker pushes into, as it is when it starts; a
    // record is made only while it is still that one (see `push_one`).
    let Some(binding) = RepoBinding::read(&pusher.repo).await? else {
        return Ok(());
    };
    let started = Instant::now();
    // Segments this worker could not record: left to PostgreSQL's own calls.
    let mut given_up: HashSet<WalFileName> = opts
        .skip
        .iter()
        .filter_map(|n| WalFileName::parse(n).ok())
        .collect();
    let mut done = 0;
    // A sliding window, not rounds: `concurrency` pushes run while up to
    // `push_ahead` segments are claimed, and each finished push is replaced
    // at once, so the cores never wait for the slowest push of a batch.
    let concurrency = (2 * cores()).min(opts.push_ahead.max(1));
    let mut queue: VecDeque<WalFileName> = VecDeque::new();
    let mut busy: HashSet<WalFileName> = HashSet::new();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    loop {
        if queue.is_empty() && busy.len() < opts.push_ahead && started.elapsed() < WORKER_LIFETIME {
            spool.prune_pushed(&opts.wal_dir);
            let skip: HashSet<WalFileName> = given_up.union(&busy).copied().collect();
            queue.extend(ready_segments(
                &opts.wal_dir,
                &spool,
                &binding,
                &skip,
                opts.push_ahead.max(1) - busy.len(),
            ));
        }
        let mut claims_changed = false;
        while in_flight.len() < concurrency
            && let Some(name) = queue.pop_front()
        {
            // Archived meanwhile by PostgreSQL's own call: nothing to do.
            let status = opts.wal_dir.join(format!("archive_status/{name}.ready"));
            if !status.exists() {
                continue;
            }
            busy.insert(name);
            in_flight.push(push_one(&pusher, &spool, &binding, &opts.wal_dir, name));
            claims_changed = true;
        }
        // Only pushes under way are claimed: a call for a segment that is
        // merely queued pushes it itself rather than wait on a worker that
        // runs at low priority.
        if claims_changed {
            let claimed: Vec<WalFileName> = busy.iter().copied().collect();
            spool.set_claims(WorkerKind::Push, &binding, &claimed);
        }
        // A push stuck on the store (a hung connection) must not hold
        // PostgreSQL's calls waiting on its claims: give up.
        let next = match tokio::time::timeout(PUSH_LIMIT, in_flight.next()).await {
            Ok(Some(next)) => next,
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(
                    "no push ahead finished within {} s; leaving the rest to PostgreSQL's own calls",
                    PUSH_LIMIT.as_secs()
                );
                break;
            }
        };
        let (name, result) = next;
        busy.remove(&name);
        if !matches!(result, Ok(true)) {
            // No record will come: release the claim so no call waits on it.
            let claimed: Vec<WalFileName> = busy.iter().copied().collect();
            spool.set_claims(WorkerKind::Push, &binding, &claimed);
        }
        match result {
            Ok(true) => done += 1,
            Ok(false) => {
                given_up.insert(name);
            }
            Err(e) => {
                tracing::warn!(
                    "pushing {name} ahead failed ({e}); it will be pushed when PostgreSQL asks"
                );
                given_up.insert(name);
            }
        }
    }
    spool.set_claims(WorkerKind::Push, &binding, &[]);
    tracing::info!(
        "pushed {done} segments ahead ({} ms)",
        started.elapsed().as_millis()
    );
    Ok(())
}

/// Pushes one segment ahead into the repository `binding`; whether it was
/// recorded.
async fn push_one(
    pusher: &Pusher,
    spool: &Spool,
    binding: &RepoBinding,
    wal_dir: &Path,
    name: WalFileName,
) -> (WalFileName, Result<bool>) {
    let path = wal_dir.join(name.to_string());
    let result = async {
        let read_from = std::time::SystemTime::now();
        // One compressing thread each: the pushes themselves run in parallel.
        let pushed = pusher.push(&name, &path, 1).await?;
        // A record says "stored in this repository": made only if the one
        // the push checked and the one there now are both `binding` (a
        // mount switched or a repository recreated meanwhile is another).
        let now = RepoBinding::read(&pusher.repo).await?;
        if pusher.binding().as_ref() != Some(binding) || now.as_ref() != Some(binding) {
            tracing::warn!(
                "the repository at {} changed while {name} was pushed ahead; \
                 it will be pushed when PostgreSQL asks",
                pusher.repo.url()
            );
            return Ok(false);
        }
        match pushed.unchanged {
            Some(meta) => {
                let identity = FileIdentity::of(&meta, &pushed.header.sha256, read_from);
                spool.record_pushed(binding, &name, &identity)?;
                Ok(true)
            }
            // Changed under us: no record; PostgreSQL's own call pushes it.
            None => Ok(false),
        }
    }
    .await;
    (name, result)
}
