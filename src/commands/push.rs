//! `walvault push <path> <name>`: PostgreSQL's archive_command.

use crate::ahead::spool::{FileIdentity, RepoBinding, Spool, WorkerKind, metadata_key};
use crate::error::{Context, Error, Result};
use crate::format::key::{Key, wal_key};
use crate::format::object::Sha256Digest;
use crate::format::object::{self, ObjectError, ObjectHeader};
use crate::pg::wal::{SegmentHeader, WalFileName};
use crate::repository::{Created, RepoUrl, Repository, RepositoryConfig};
use crate::store::Payload;
use futures::StreamExt;
use std::collections::{HashSet, VecDeque};
use std::io::{Read, Seek, SeekFrom};
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

/// What the bytes of a segment say about the cluster that wrote them.
fn cluster_of_segment(
    name: &WalFileName,
    path: &Path,
    head: &[u8],
    file_len: u64,
) -> Result<Option<RepositoryConfig>> {
    let Some(segment) = name.segment_with_header() else {
        return Ok(None);
    };
    let refuse = |why: String| {
        Error::usage(format!(
            "{} is not a valid WAL segment for {name}: {why}; nothing was archived",
            path.display()
        ))
    };
    let header = SegmentHeader::parse(head).map_err(|e| refuse(e.0))?;
    header.check_matches(segment).map_err(|e| refuse(e.0))?;
    if file_len != u64::from(header.segment_size) {
        return Err(refuse(format!(
            "it is {file_len} bytes but its header says segments are {} bytes",
            header.segment_size
        )));
    }
    Ok(Some(RepositoryConfig {
        format: crate::repository::REPOSITORY_FORMAT,
        system_identifier: header.system_identifier.to_string(),
        pg_version: header.pg_version(),
        wal_segment_size: header.segment_size,
        created_at: chrono::Utc::now(),
    }))
}

/// The system identifier in the control file of the data directory `path`
/// lies in, when `path` is in a `pg_wal` (as PostgreSQL passes `%p`).
/// History and backup history files carry no cluster identity of their own;
/// the cluster archiving them does.
fn cluster_of_data_directory(path: &Path) -> Result<Option<String>> {
    let Some(wal_dir) = path
        .parent()
        .filter(|p| p.file_name() == Some("pg_wal".as_ref()))
    else {
        return Ok(None);
    };
    let control = wal_dir
        .parent()
        .unwrap_or(Path::new(""))
        .join("global/pg_control");
    let mut head = [0u8; 8];
    match std::fs::File::open(&control).and_then(|mut f| f.read_exact(&mut head)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::io(format!(
                "cannot read {} to check which cluster {} comes from: {e}; nothing was archived",
                control.display(),
                path.display()
            )));
        }
    }
    // ControlFileData begins with the system identifier, in every version.
    let id = u64::from_le_bytes(head);
    Ok((id != 0).then(|| id.to_string()))
}

/// How long a push waits for the background worker to finish a segment it
/// has claimed before pushing the segment itself.
const CLAIM_WAIT: Duration = Duration::from_secs(120);

pub async fn run(url: &RepoUrl, opts: &PushOptions) -> Result<()> {
    let started = Instant::now();
    let name = WalFileName::parse(&opts.name).map_err(|e| Error::usage(e.to_string()))?;
    let spool = Spool::locate(opts.spool.as_deref(), &opts.path);
    // The repository there now: only records made for it prove anything.
    let config = match &spool {
        Some(_) => match Repository::open(url, false) {
            Ok(repo) => repo.config().await.ok().flatten(),
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
fn ready_segments(
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

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// Runs `f` and says whether `path` kept its identity (device, inode, size, times)
/// meanwhile: the metadata afterwards if so.
fn while_unchanged<T>(
    path: &Path,
    f: impl FnOnce() -> Result<T>,
) -> Result<(T, Option<std::fs::Metadata>)> {
    let stat = || std::fs::metadata(path).context(|| format!("cannot read {}", path.display()));
    let before = stat()?;
    let value = f()?;
    let after = stat()?;
    let meta = (metadata_key(&before) == metadata_key(&after)).then_some(after);
    Ok((value, meta))
}

fn sha256_of_file(path: &Path) -> Result<Sha256Digest> {
    Sha256Digest::of_file(path).context(|| format!("cannot read {}", path.display()))
}

/// Pushes files into one repository, checking the cluster once.
struct Pusher {
    repo: Repository,
    level: i32,
    cluster: tokio::sync::OnceCell<RepositoryConfig>,
}

struct Pushed {
    header: ObjectHeader,
    stored: usize,
    /// The repository held this content already; nothing new was stored.
    already: bool,
    /// The file's metadata, when it did not change while it was read.
    unchanged: Option<std::fs::Metadata>,
}

impl Pusher {
    /// `config`: the repository's walvault.json when it was just read (its
    /// cluster is still checked against every segment).
    fn new(url: &RepoUrl, level: i32, config: Option<RepositoryConfig>) -> Result<Pusher> {
        Ok(Pusher {
            repo: Repository::open(url, true)?,
            level,
            cluster: tokio::sync::OnceCell::new_with(config),
        })
    }

    /// The binding of the repository as this pusher found it (once it has
    /// checked a segment's cluster against it).
    fn binding(&self) -> Option<RepoBinding> {
        self.cluster
            .get()
            .map(|config| RepoBinding::of(self.repo.url(), config))
    }

    /// Pushes one file, compressing its frames on `workers` threads.
    async fn push(&self, name: &WalFileName, path: &Path, workers: usize) -> Result<Pushed> {
        let cannot_read =
            |e: std::io::Error| Error::io(format!("cannot read {}: {e}", path.display()));
        let mut file = std::fs::File::open(path).map_err(cannot_read)?;
        let len = file.metadata().map_err(cannot_read)?.len();
        let mut head = vec![0u8; 8192.min(len as usize)];
        file.read_exact(&mut head).map_err(cannot_read)?;
        if let Some(cluster) = cluster_of_segment(name, path, &head, len)? {
            let bound = self
                .cluster
                .get_or_try_init(|| self.repo.bind_cluster(&cluster))
                .await?;
            bound.check_same_cluster(&cluster, self.repo.url())?;
        } else if let Some(ours) = cluster_of_data_directory(path)? {
            // A repository not bound yet takes it: after a restore into a new
            // repository, the new timeline's history file is archived first.
            let bound = match self.cluster.get() {
                Some(config) => Some(config.clone()),
                None => self.repo.config().await?,
            };
            if let Some(bound) = bound.filter(|b| b.system_identifier != ours) {
                return Err(Error::conflict(format!(
                    "repository {} belongs to cluster {} but {name} comes from cluster {ours} \
                     (its data directory's global/pg_control); two clusters must not share a \
                     repository: give this one its own --repo; nothing was archived",
                    self.repo.url(),
                    bound.system_identifier
                )));
            }
        }
        file.seek(SeekFrom::Start(0)).map_err(cannot_read)?;
        let level = self.level;
        let owned = path.to_path_buf();
        let key = wal_key(name);
        // Where the store can, the object is written as it is made.
        let staging = self.repo.stage(&key);
        // Compression and hashing are the CPU of a push: off the async threads,
        // so pushes ahead run truly in parallel.
        let (encoded, unchanged, staging) = tokio::task::spawn_blocking(move || {
            let (encoded, unchanged) = while_unchanged(&owned, || {
                object::encode_file(&file, len, level, workers, staging.file())
                    .context(|| format!("cannot read and compress {}", owned.display()))
            })?;
            Ok::<_, Error>((encoded, unchanged, staging))
        })
        .await
        .map_err(|e| Error::io(format!("compression task failed: {e}")))??;
        let header = encoded.header;
        let stored = encoded.stored_len;
        // The name taken already: our object, to compare with what is there.
        let taken = self.repo.put_staged(&key, staging, encoded.parts).await?;
        let already = match taken {
            Some(ours) => settle_existing(&self.repo, name, &key, header, ours).await?,
            None => false,
        };
        Ok(Pushed {
            header,
            stored,
            already,
            unchanged,
        })
    }
}

/// What is stored under a name we are pushing.
enum Stored {
    Same,
    Different(ObjectHeader),
    /// Written by a newer walvault: not ours to judge or replace.
    Unreadable(ObjectError),
    /// Fails its own checks: cannot be what anyone meant to archive.
    Damaged(ObjectError),
}

/// The name is already archived: fine if it is the same content, refused if
/// not. A stored copy that fails its own checks (it cannot be what anyone
/// meant to archive) is replaced, so one damaged object cannot block the
/// archiver forever. Whether the same content was there already.
async fn settle_existing(
    repo: &Repository,
    name: &WalFileName,
    key: &Key,
    ours: ObjectHeader,
    encoded: Payload,
) -> Result<bool> {
    let stored = repo.get(key).await?;
    // Compare headers first; decode only as far as needed to tell an intact
    // copy from a damaged one.
    let verdict = stored.as_deref().map(|obj| match object::read_header(obj) {
        Err(e @ (ObjectError::UnsupportedVersion(_) | ObjectError::UnsupportedCompression(_))) => {
            Stored::Unreadable(e)
        }
        Err(e) => Stored::Damaged(e),
        Ok(theirs) if theirs == ours => match object::decode_limited(obj, ours.length) {
            Ok(_) => Stored::Same,
            Err(e) => Stored::Damaged(e),
        },
        Ok(theirs) => match object::decode(obj) {
            Ok(_) => Stored::Different(theirs),
            Err(e) => Stored::Damaged(e),
        },
    });
    match verdict {
        Some(Stored::Same) => {
            repo.make_durable(key).await?;
            tracing::info!(
                "{name} is already archived with identical content (sha256 {}); nothing to do",
                ours.sha256
            );
            Ok(true)
        }
        Some(Stored::Different(theirs)) => Err(Error::conflict(format!(
            "{name} is already archived with different content (stored sha256 {}, {} bytes; \
             this file sha256 {}, {} bytes); the stored copy is kept. Likely a split brain, \
             two clusters archiving into one repository, or a restored old primary still \
             archiving: find which server should own this repository",
            theirs.sha256, theirs.length, ours.sha256, ours.length
        ))),
        Some(Stored::Unreadable(e)) => Err(Error::conflict(format!(
            "{name} is already archived in a form this walvault cannot read ({e}); the stored copy is kept"
        ))),
        Some(Stored::Damaged(e)) => {
            tracing::warn!(
                "stored copy of {name} is damaged ({e}); replacing it with this file's content"
            );
            repo.put_replace(key, encoded).await.map(|()| false)
        }
        // Deleted between our create and our read (a prune): write it again.
        None => match repo.put_new(key, encoded).await? {
            Created::New => Ok(false),
            Created::AlreadyExists => Err(Error::io(format!(
                "{name} keeps changing in the repository while being archived; retry"
            ))),
        },
    }
}
