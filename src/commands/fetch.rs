//! `walvault fetch <name> <path>`: PostgreSQL's restore_command.
//!
//! Recovery asks for one segment at a time and waits for each; with
//! `--prefetch K` the following segments of the same timeline are downloaded
//! in parallel into the spool, so most calls are a local, verified rename.

use crate::commands::{Durability, write_atomically_with};
use crate::error::{Context, Error, Result};
use crate::object::{self, Sha256Digest};
use crate::repository::{RepoUrl, Repository, wal_key};
use crate::spool::Spool;
use crate::wal::{SegmentName, WalFileName};
use futures::StreamExt;
use std::path::{Path, PathBuf};

pub struct FetchOptions {
    /// `%f`: the file PostgreSQL asks for.
    pub name: String,
    /// `%p`: where to put it, relative to the working directory.
    pub path: PathBuf,
    /// How many following segments to keep downloaded ahead (0: none;
    /// `None`: as many as fit in [`PREFETCH_BUDGET`]).
    pub prefetch: Option<usize>,
    pub spool: Option<PathBuf>,
}

/// Disk the prefetch spool may use by default.
pub const PREFETCH_BUDGET: u64 = 256 << 20;
const PREFETCH_MAX: usize = 64;

/// The window: given, or what fits the budget (8 while the segment size is unknown).
fn window_len(given: Option<usize>, segment_size: Option<u32>) -> usize {
    given.unwrap_or_else(|| match segment_size {
        Some(s) => ((PREFETCH_BUDGET / u64::from(s.max(1))) as usize).clamp(1, PREFETCH_MAX),
        None => 8,
    })
}

pub async fn run(url: &RepoUrl, opts: &FetchOptions) -> Result<()> {
    let name = WalFileName::parse(&opts.name).map_err(|e| Error::usage(e.to_string()))?;
    let ahead = match (name, Spool::locate(opts.spool.as_deref(), &opts.path)) {
        (WalFileName::Segment(segment), Some(spool)) if opts.prefetch != Some(0) => {
            Some((segment, spool))
        }
        _ => None,
    };
    let Some((segment, spool)) = ahead else {
        let repo = Repository::open(url, false)?;
        return fetch_from_repository(&repo, &name, &opts.path).await;
    };

    // Only this segment's successors on its timeline are worth keeping.
    let size = spool.segment_size();
    let depth = window_len(opts.prefetch, size);
    let window = size
        .map(|s| successors(segment, s, depth))
        .unwrap_or_default();
    spool.discard_prefetched(|n| {
        *n == name || matches!(n, WalFileName::Segment(s) if window.contains(s))
    });

    if hand_over(&spool, &name, &opts.path)? {
        tracing::debug!("restored {name} from the prefetch spool");
        let have = spool.prefetched().len();
        if have * 2 <= depth && !window.is_empty() {
            let repo = Repository::open(url, false)?;
            prefetch(&repo, &spool, &window).await;
        }
        return Ok(());
    }
    let repo = Repository::open(url, false)?;
    // Not prefetched: fetch it and the next ones at once.
    let window = match size {
        Some(s) => successors(segment, s, depth),
        None => match repo.config().await {
            Ok(Some(config)) => {
                spool.remember_segment_size(config.wal_segment_size);
                let size = Some(config.wal_segment_size);
                successors(
                    segment,
                    config.wal_segment_size,
                    window_len(opts.prefetch, size),
                )
            }
            _ => vec![],
        },
    };
    let (result, ()) = tokio::join!(
        fetch_from_repository(&repo, &name, &opts.path),
        prefetch(&repo, &spool, &window)
    );
    result
}

fn successors(segment: SegmentName, segment_size: u32, count: usize) -> Vec<SegmentName> {
    std::iter::successors(Some(segment.next(segment_size)), |s| {
        Some(s.next(segment_size))
    })
    .take(count)
    .collect()
}

async fn fetch_from_repository(repo: &Repository, name: &WalFileName, path: &Path) -> Result<()> {
    let key = wal_key(name);
    let Some(stored) = repo.get(&key).await? else {
        // Recovery asks for files that do not exist yet; that is "end of
        // archive", not a failure. A repository that is not there at all is.
        repo.require_config().await?;
        return Err(Error::not_found(format!("{name} is not in the archive")));
    };
    // Decompressed straight into a temporary file beside `path`, hashed on
    // the way; renamed into place only once length and sha256 are proven.
    // No fsync: PostgreSQL makes a restored file durable itself when it
    // keeps it, and asks again after a crash.
    write_atomically_with(path, Some(0o600), Durability::Visible, |file| {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let result = object::decode_into(&stored, &mut out, limit_for(name));
        let flushed = std::io::Write::flush(&mut out);
        match (result, flushed) {
            (Ok(_), Ok(())) => Ok(()),
            (Err(object::ObjectError::Write(e)), _) => {
                Err(Error::io(format!("cannot write {}: {e}", path.display())))
            }
            (Ok(_), Err(e)) => Err(Error::io(format!("cannot write {}: {e}", path.display()))),
            (Err(e), _) => Err(Error::corrupt(format!(
                "{name} in {} ({key}) is damaged: {e}; nothing was written to {}. \
                 Run 'walvault verify' and restore the object from another copy",
                repo.url(),
                path.display()
            ))),
        }
    })?;
    tracing::debug!("restored {name} to {}", path.display());
    Ok(())
}

/// Segments are at most 1 GiB; every other WAL file is a few lines of text.
fn limit_for(name: &WalFileName) -> u64 {
    match name.segment_with_header() {
        Some(_) => object::MAX_CONTENT,
        None => 16 << 20,
    }
}

fn decode(
    name: &WalFileName,
    stored: &[u8],
) -> Result<(object::ObjectHeader, Vec<u8>), object::ObjectError> {
    object::decode_limited(stored, limit_for(name))
}

/// Moves a prefetched copy of `name` to `path` after proving its sha256; a
/// copy that fails is deleted and the caller fetches from the repository.
fn hand_over(spool: &Spool, name: &WalFileName, path: &Path) -> Result<bool> {
    let Some((_, sha, file)) = spool.prefetched().into_iter().find(|(n, _, _)| n == name) else {
        return Ok(false);
    };
    let actual =
        Sha256Digest::of_file(&file).context(|| format!("cannot read {}", file.display()))?;
    if actual != sha {
        tracing::warn!("prefetched copy of {name} is damaged; fetching it again");
        let _ = std::fs::remove_file(&file);
        return Ok(false);
    }
    // No fsync, as in fetch_from_repository.
    std::fs::rename(&file, path)
        .context(|| format!("cannot move {} to {}", file.display(), path.display()))?;
    Ok(true)
}

/// Downloads, verifies and spools those of `window` not already spooled.
/// Best effort: a segment missing or failing here is fetched on demand.
async fn prefetch(repo: &Repository, spool: &Spool, window: &[SegmentName]) {
    let have: Vec<WalFileName> = spool.prefetched().into_iter().map(|(n, _, _)| n).collect();
    let wanted: Vec<WalFileName> = window
        .iter()
        .map(|s| WalFileName::Segment(*s))
        .filter(|n| !have.contains(n))
        .collect();
    futures::stream::iter(wanted.iter().map(|name| async move {
        match repo.get(&wal_key(name)).await {
            Ok(Some(stored)) => match decode(name, &stored) {
                Ok((header, data)) => {
                    if let Err(e) = spool.store_prefetched(name, &header.sha256, &data) {
                        tracing::debug!("cannot spool {name}: {e}");
                    }
                }
                Err(e) => {
                    tracing::warn!("{name} in the repository is damaged ({e}); not prefetched")
                }
            },
            Ok(None) => {}
            Err(e) => tracing::debug!("prefetch of {name} failed: {e}"),
        }
    }))
    .buffer_unordered(window.len().max(1))
    .collect::<Vec<()>>()
    .await;
}
