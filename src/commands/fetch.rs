//! `walvault fetch <name> <path>`: PostgreSQL's restore_command.
//!
//! Recovery asks for one segment at a time and waits for each; with
//! `--prefetch K` a background worker downloads the following K segments of
//! the same timeline in parallel into the spool while recovery replays, so
//! most calls are a local, verified rename.

use crate::commands::{Durability, write_atomically_with};
use crate::error::{Context, Error, Result};
use crate::object::{self, Sha256Digest};
use crate::repository::{ObjectReader, RepoUrl, Repository, wal_key};
use crate::spool::{RepoBinding, Spool, WorkerKind};
use crate::wal::{SegmentName, WalFileName};
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

/// How long a fetch waits for the background worker to finish downloading
/// a segment it has claimed before downloading the segment itself.
/// Also the most a prefetch worker spends downloading.
const CLAIM_WAIT: Duration = Duration::from_secs(60);

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

    let spooled = wait_for_worker(url, &spool, &name).await;
    if hand_over(&spooled, &name, &opts.path) {
        tracing::debug!("restored {name} from the prefetch spool");
        // Refill once half the window is used up, in the background.
        if let Some(size) = size
            && (spooled.len() - 1) * 2 <= depth
        {
            start_worker(&spool, url, segment, depth, size);
        }
        return Ok(());
    }
    let repo = Repository::open(url, false)?;
    fetch_from_repository(&repo, &name, &opts.path).await?;
    let size = match size {
        Some(s) => Some(s),
        None => match repo.config().await {
            Ok(Some(config)) => {
                spool.remember_segment_size(config.wal_segment_size);
                Some(config.wal_segment_size)
            }
            _ => None,
        },
    };
    if let Some(size) = size {
        start_worker(
            &spool,
            url,
            segment,
            window_len(opts.prefetch, Some(size)),
            size,
        );
    }
    Ok(())
}

/// If the background worker is downloading `name` from this repository
/// right now, waits for it rather than downloading the same object twice;
/// then the copies spooled for this repository (none if nothing spooled or
/// claimed is `name`: then there is no need to ask which repository this is).
async fn wait_for_worker(
    url: &RepoUrl,
    spool: &Spool,
    name: &WalFileName,
) -> Vec<(WalFileName, Sha256Digest, PathBuf)> {
    if !spool.claimed_by_any(WorkerKind::Prefetch, name) && !spool.prefetched_by_any(name) {
        return vec![];
    }
    // Copies speak only for the repository they came from: the one at this
    // URL now must be it (see `RepoBinding`).
    let binding = match Repository::open(url, false) {
        Ok(repo) => RepoBinding::read(&repo).await.ok().flatten(),
        Err(_) => None,
    };
    let Some(binding) = binding else {
        return vec![];
    };
    let since = Instant::now();
    let spooled = || spool.prefetched(&binding).iter().any(|(n, _, _)| n == name);
    while spool.claimed(WorkerKind::Prefetch, &binding, name)
        && spool.worker_running(WorkerKind::Prefetch)
        && since.elapsed() < CLAIM_WAIT
        && !spooled()
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    spool.prefetched(&binding)
}

fn start_worker(spool: &Spool, url: &RepoUrl, after: SegmentName, count: usize, size: u32) {
    let args: Vec<std::ffi::OsString> = vec![
        "--count".into(),
        count.to_string().into(),
        "--segment-size".into(),
        size.to_string().into(),
        WalFileName::Segment(after).to_string().into(),
    ];
    crate::commands::spawn_worker(spool, WorkerKind::Prefetch, url, &args);
}

pub struct AheadOptions {
    /// The segment just handed to recovery.
    pub after: String,
    pub spool: PathBuf,
    /// How many of its successors to keep spooled.
    pub count: usize,
    pub segment_size: u32,
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
    let repo = Repository::open(url, false)?;
    // Copies are kept for this repository only (see `RepoBinding`).
    let Some(binding) = RepoBinding::read(&repo).await? else {
        return Ok(());
    };
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

fn successors(segment: SegmentName, segment_size: u32, count: usize) -> Vec<SegmentName> {
    std::iter::successors(Some(segment.next(segment_size)), |s| {
        Some(s.next(segment_size))
    })
    .take(count)
    .collect()
}

async fn fetch_from_repository(repo: &Repository, name: &WalFileName, path: &Path) -> Result<()> {
    let key = wal_key(name);
    let Some(reader) = repo.open_object(&key).await? else {
        // Recovery asks for files that do not exist yet; that is "end of
        // archive", not a failure. A repository that is not there at all is.
        repo.require_config().await?;
        return Err(Error::not_found(format!("{name} is not in the archive")));
    };
    // Decompressed straight into a temporary file beside `path`, hashed on
    // the way; renamed into place only once length and sha256 are proven.
    // Frames are decoded as they arrive, while the rest is still read. No
    // fsync: PostgreSQL makes a restored file durable itself when it keeps
    // it, and asks again after a crash.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let limit = limit_for(name);
    // Owned, so that the thread decoding a streamed object can use it too.
    let explain = {
        let (name, url, shown) = (*name, repo.url().to_string(), path.display().to_string());
        let key = key.clone();
        move |e: object::ObjectError| match e {
            object::ObjectError::Write(e) => Error::io(format!("cannot write {shown}: {e}")),
            object::ObjectError::Read(e) => Error::io(format!(
                "cannot read {key} in {url}: {e}; nothing was written to {shown}"
            )),
            object::ObjectError::Internal(e) => Error::io(format!(
                "fetching {name} failed: {e}; nothing was written to {shown}"
            )),
            e => Error::corrupt(format!(
                "{name} in {url} ({key}) is damaged: {e}; nothing was written to {shown}. \
                 Run 'walvault verify' and restore the object from another copy"
            )),
        }
    };
    // Room for the whole object up front, unless it is longer than any
    // object of this kind can be (then it is not read at all).
    let (ObjectReader::File { size, .. } | ObjectReader::Stream { size, .. }) = &reader;
    let size = *size;
    if size > object::max_stored_len(limit) {
        return Err(explain(object::ObjectError::Corrupt(format!(
            "it is {size} bytes long, more than any object of at most {limit} bytes of content"
        ))));
    }
    let room = || bytes::BytesMut::with_capacity(size as usize);
    match reader {
        ObjectReader::File { mut file, .. } => {
            let mut fill = |buf: &mut bytes::BytesMut| read_piece(&mut file, buf);
            decode_in_place(path, room(), &mut fill, limit, workers, &explain)?;
        }
        ObjectReader::Stream { mut stream, .. } => {
            // The body is read here while a blocking thread decodes it.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<object_store::Result<bytes::Bytes>>(16);
            let target = path.to_path_buf();
            let initial = room();
            let decode = tokio::task::spawn_blocking(move || {
                let mut received = 0u64;
                let mut fill = |buf: &mut bytes::BytesMut| match rx.blocking_recv() {
                    Some(Ok(piece)) => {
                        buf.extend_from_slice(&piece);
                        received += piece.len() as u64;
                        Ok(piece.len().max(1)) // an empty piece is not the end
                    }
                    Some(Err(e)) => Err(object::ObjectError::Read(crate::repository::redact(
                        &e.to_string(),
                    ))),
                    // A connection cut short is the store's failure, not damage.
                    None if received < size => Err(object::ObjectError::Read(format!(
                        "the store sent {received} of its {size} bytes"
                    ))),
                    None => Ok(0),
                };
                decode_in_place(&target, initial, &mut fill, limit, workers, &explain)
            });
            let pump = async move {
                while let Some(piece) = stream.next().await {
                    if tx.send(piece).await.is_err() {
                        break;
                    }
                }
            };
            let (decoded, ()) = tokio::join!(decode, pump);
            decoded.map_err(|e| Error::io(format!("decoding {name} failed: {e}")))??;
        }
    }
    tracing::debug!("restored {name} to {}", path.display());
    Ok(())
}

/// Decodes an object, as `fill` delivers it after `initial`, into a
/// temporary file beside `path`, and renames that into place only once
/// length and sha256 are proven.
fn decode_in_place(
    path: &Path,
    initial: bytes::BytesMut,
    fill: &mut object::Fill<'_>,
    limit: u64,
    workers: usize,
    explain: &dyn Fn(object::ObjectError) -> Error,
) -> Result<()> {
    write_atomically_with(path, Some(0o600), Durability::Visible, |out| {
        object::decode_to_file_from(initial, fill, out, limit, workers)
            .map(drop)
            .map_err(explain)
    })
}

/// Reads the next piece of a local object onto the end of `buf`, straight
/// into its spare room (zeroing it first cost a pass over every byte).
fn read_piece(
    file: &mut std::fs::File,
    buf: &mut bytes::BytesMut,
) -> Result<usize, object::ObjectError> {
    use std::os::fd::AsRawFd;
    const PIECE: usize = 256 << 10;
    if buf.capacity() - buf.len() < 8 << 10 {
        buf.reserve(PIECE);
    }
    loop {
        let spare = buf.spare_capacity_mut();
        let room = spare.len().min(PIECE);
        // SAFETY: read(2) writes at most `room` bytes into the spare
        // capacity `spare` points at, which `buf` owns; no reference to the
        // uninitialized bytes is made.
        let n = unsafe { libc::read(file.as_raw_fd(), spare.as_mut_ptr().cast(), room) };
        if n >= 0 {
            // SAFETY: the kernel initialized the first `n` spare bytes.
            unsafe { buf.set_len(buf.len() + n as usize) };
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(object::ObjectError::Read(e.to_string()));
        }
    }
}

/// Segments are at most 1 GiB; every other WAL file is a few lines of text.
fn limit_for(name: &WalFileName) -> u64 {
    match name.segment_with_header() {
        Some(_) => object::MAX_CONTENT,
        None => 16 << 20,
    }
}

/// Moves a prefetched copy of `name` to `path` after proving its sha256;
/// whether it did. `spooled` is the spool's listing for this repository.
/// The spool is only a shortcut: a copy that cannot be handed over, for
/// whatever reason, is deleted and the caller fetches from the repository.
fn hand_over(
    spooled: &[(WalFileName, Sha256Digest, PathBuf)],
    name: &WalFileName,
    path: &Path,
) -> bool {
    let Some((_, sha, file)) = spooled.iter().find(|(n, _, _)| n == name) else {
        return false;
    };
    match move_verified(file, sha, path) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                "cannot hand over the prefetched copy of {name} ({e}); fetching it from the repository"
            );
            let _ = std::fs::remove_file(file);
            false
        }
    }
}

/// Puts the spooled `file` at `path` once it has proven to hash to `sha`:
/// a rename, or on another filesystem a copy, hashed as it is made and
/// renamed into place only if it matches.
fn move_verified(file: &Path, sha: &Sha256Digest, path: &Path) -> Result<()> {
    let actual =
        Sha256Digest::of_file(file).context(|| format!("cannot read {}", file.display()))?;
    if actual != *sha {
        return Err(Error::corrupt(format!("{} is damaged", file.display())));
    }
    // No fsync, as in fetch_from_repository.
    match std::fs::rename(file, path) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {}
        Err(e) => {
            return Err(Error::io(format!(
                "cannot move {} to {}: {e}",
                file.display(),
                path.display()
            )));
        }
    }
    // The spool is on another filesystem.
    write_atomically_with(path, Some(0o600), Durability::Visible, |out| {
        let mut hashing = HashingReader {
            inner: std::fs::File::open(file)
                .context(|| format!("cannot read {}", file.display()))?,
            hasher: <sha2::Sha256 as sha2::Digest>::new(),
        };
        std::io::copy(&mut hashing, out)
            .context(|| format!("cannot copy {} to {}", file.display(), path.display()))?;
        let copied = Sha256Digest(sha2::Digest::finalize(hashing.hasher).into());
        if copied != *sha {
            return Err(Error::corrupt(format!(
                "{} changed while it was copied",
                file.display()
            )));
        }
        Ok(())
    })?;
    let _ = std::fs::remove_file(file);
    Ok(())
}

/// Hashes what is read through it.
struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        sha2::Digest::update(&mut self.hasher, &buf[..n]);
        Ok(n)
    }
}

/// Downloads at once by the prefetch worker. Each streams its object into
/// its spool file, holding only the frames being decoded; so the worker's
/// memory is bounded by this, never by the window.
const PREFETCH_PARALLEL: usize = 4;

/// Downloads, verifies and spools `wanted`, [`PREFETCH_PARALLEL`] at a
/// time; returns how many were spooled. Best effort: a segment missing or
/// failing here is fetched on demand. Each is decoded as it arrives
/// straight into its spool file, off the async thread.
async fn prefetch(
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
async fn prefetch_one(
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
    let (ObjectReader::File { size, .. } | ObjectReader::Stream { size, .. }) = &reader;
    let size = *size;
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
    match reader {
        ObjectReader::File { mut file, .. } => tokio::task::spawn_blocking(move || {
            store(&mut |buf: &mut bytes::BytesMut| read_piece(&mut file, buf))
        })
        .await
        .map_err(task_failed)?,
        ObjectReader::Stream { mut stream, .. } => {
            // The body is read here while a blocking thread decodes it; the
            // channel bounds what waits in between.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<object_store::Result<bytes::Bytes>>(16);
            let decode = tokio::task::spawn_blocking(move || {
                let mut received = 0u64;
                store(&mut |buf: &mut bytes::BytesMut| match rx.blocking_recv() {
                    Some(Ok(piece)) => {
                        buf.extend_from_slice(&piece);
                        received += piece.len() as u64;
                        Ok(piece.len().max(1)) // an empty piece is not the end
                    }
                    Some(Err(e)) => Err(object::ObjectError::Read(crate::repository::redact(
                        &e.to_string(),
                    ))),
                    None if received < size => Err(object::ObjectError::Read(format!(
                        "the store sent {received} of its {size} bytes"
                    ))),
                    None => Ok(0),
                })
            });
            let pump = async move {
                while let Some(piece) = stream.next().await {
                    if tx.send(piece).await.is_err() {
                        break;
                    }
                }
            };
            let (decoded, ()) = tokio::join!(decode, pump);
            decoded.map_err(task_failed)?
        }
    }
}
