//! `walvault push <path> <name>`: PostgreSQL's archive_command.

use crate::error::{Context, Error, Result};
use crate::object::Sha256Digest;
use crate::object::{self, ObjectError, ObjectHeader};
use crate::repository::{Created, RepoUrl, Repository, RepositoryConfig, wal_key};
use crate::spool::{FileIdentity, Spool};
use crate::wal::{SegmentHeader, WalFileName};
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct PushOptions {
    /// `%p`: the file, relative to the working directory (the data directory).
    pub path: PathBuf,
    /// `%f`: the name PostgreSQL archives it under.
    pub name: String,
    pub compress_level: i32,
    /// Also push up to this many other `.ready` segments, in parallel.
    pub push_ahead: usize,
    /// Where records of segments pushed ahead are kept (default: pg_wal/walvault-spool).
    pub spool: Option<PathBuf>,
}

/// What the bytes of a segment say about the cluster that wrote them.
fn cluster_of_segment(
    name: &WalFileName,
    path: &Path,
    data: &[u8],
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
    let header = SegmentHeader::parse(data).map_err(|e| refuse(e.0))?;
    header.check_matches(segment).map_err(|e| refuse(e.0))?;
    if data.len() as u64 != u64::from(header.segment_size) {
        return Err(refuse(format!(
            "it is {} bytes but its header says segments are {} bytes",
            data.len(),
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

pub async fn run(url: &RepoUrl, opts: &PushOptions) -> Result<()> {
    let started = Instant::now();
    let name = WalFileName::parse(&opts.name).map_err(|e| Error::usage(e.to_string()))?;
    let spool = Spool::locate(opts.spool.as_deref(), &opts.path);
    let read = read_stable(&opts.path)?;

    // Pushed ahead by an earlier call, and the file is still exactly what was
    // pushed then: nothing to do.
    if let Some(spool) = &spool
        && let Some(record) = spool.pushed(&name)
    {
        spool.forget_pushed(&name);
        let now = read
            .meta
            .as_ref()
            .map(|m| FileIdentity::of(m, &Sha256Digest::of(&read.data)));
        if now.as_ref() == Some(&record) {
            tracing::info!(
                "{name} was archived ahead; verified unchanged ({} ms)",
                started.elapsed().as_millis()
            );
            return Ok(());
        }
        tracing::debug!("{name} changed since it was pushed ahead; pushing it again");
    }

    let pusher = Pusher {
        repo: Repository::open(url, true)?,
        level: opts.compress_level,
        cluster: tokio::sync::OnceCell::new(),
    };
    let data_len = read.data.len();
    let pushed = pusher.push(&name, &opts.path, read.data).await?;
    tracing::info!(
        "archived {name} ({data_len} bytes, stored {} bytes, {} ms)",
        pushed.stored,
        started.elapsed().as_millis()
    );
    if opts.push_ahead > 0
        && let (Some(spool), WalFileName::Segment(_)) = (&spool, name)
    {
        push_ahead(&pusher, spool, &opts.path, &name, opts.push_ahead).await;
    }
    Ok(())
}

/// A file's bytes, and its metadata when it did not change while we read it.
struct StableRead {
    data: Vec<u8>,
    meta: Option<std::fs::Metadata>,
}

fn read_stable(path: &Path) -> Result<StableRead> {
    let before = std::fs::metadata(path).context(|| format!("cannot read {}", path.display()))?;
    let data = std::fs::read(path).context(|| format!("cannot read {}", path.display()))?;
    let after = std::fs::metadata(path).context(|| format!("cannot read {}", path.display()))?;
    let same = |a: &std::fs::Metadata, b: &std::fs::Metadata| {
        use std::os::unix::fs::MetadataExt;
        (
            a.ino(),
            a.size(),
            a.mtime_nsec(),
            a.mtime(),
            a.ctime(),
            a.ctime_nsec(),
        ) == (
            b.ino(),
            b.size(),
            b.mtime_nsec(),
            b.mtime(),
            b.ctime(),
            b.ctime_nsec(),
        )
    };
    let meta = same(&before, &after).then_some(after);
    Ok(StableRead { data, meta })
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
}

impl Pusher {
    async fn push(&self, name: &WalFileName, path: &Path, data: Vec<u8>) -> Result<Pushed> {
        if let Some(cluster) = cluster_of_segment(name, path, &data)? {
            let bound = self
                .cluster
                .get_or_try_init(|| self.repo.bind_cluster(&cluster))
                .await?;
            bound.check_same_cluster(&cluster, self.repo.url())?;
        }
        let level = self.level;
        // Compression and hashing are the CPU of a push: off the async threads,
        // so pushes ahead run truly in parallel.
        let (header, encoded) = tokio::task::spawn_blocking(move || object::encode(&data, level))
            .await
            .map_err(|e| Error::io(format!("compression task failed: {e}")))?
            .context(|| format!("cannot compress {}", path.display()))?;
        let stored = encoded.len();
        let encoded = bytes::Bytes::from(encoded);
        let key = wal_key(name);
        match self.repo.put_new(&key, encoded.clone()).await? {
            Created::New => {}
            Created::AlreadyExists => {
                settle_existing(&self.repo, name, &key, header, encoded).await?
            }
        }
        Ok(Pushed { header, stored })
    }
}

/// Pushes other segments PostgreSQL has marked `.ready`, oldest first, and
/// records each in the spool once it is durable. Failures here are only
/// warnings: PostgreSQL will ask for those segments in turn.
async fn push_ahead(
    pusher: &Pusher,
    spool: &Spool,
    path: &Path,
    current: &WalFileName,
    limit: usize,
) {
    let Some(wal_dir) = path.parent() else { return };
    spool.prune_pushed(wal_dir);
    let Ok(entries) = std::fs::read_dir(wal_dir.join("archive_status")) else {
        return;
    };
    let mut ready: Vec<WalFileName> = entries
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().to_string();
            WalFileName::parse(file.strip_suffix(".ready")?).ok()
        })
        .filter(|n| {
            matches!(n, WalFileName::Segment(_)) && n != current && spool.pushed(n).is_none()
        })
        .collect();
    ready.sort_by_key(|n| n.to_string());
    ready.truncate(limit);
    if ready.is_empty() {
        return;
    }
    let started = Instant::now();
    let concurrency = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2);
    let results: Vec<(WalFileName, Result<()>)> =
        futures::stream::iter(ready.into_iter().map(|name| async move {
            let path = wal_dir.join(name.to_string());
            let result = async {
                let read = read_stable(&path)?;
                let Some(meta) = read.meta else {
                    return Ok(()); // changing under us: leave it to PostgreSQL's own call
                };
                let pushed = pusher.push(&name, &path, read.data).await?;
                spool.record_pushed(&name, &FileIdentity::of(&meta, &pushed.header.sha256))
            }
            .await;
            (name, result)
        }))
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut done = 0;
    for (name, result) in results {
        match result {
            Ok(()) => done += 1,
            Err(e) => tracing::warn!(
                "pushing {name} ahead failed ({e}); it will be pushed when PostgreSQL asks"
            ),
        }
    }
    tracing::info!(
        "pushed {done} more segments ahead ({} ms)",
        started.elapsed().as_millis()
    );
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
/// archiver forever.
async fn settle_existing(
    repo: &Repository,
    name: &WalFileName,
    key: &object_store::path::Path,
    ours: ObjectHeader,
    encoded: bytes::Bytes,
) -> Result<()> {
    let stored = repo.get(key).await?;
    // Compare headers first; decode only as far as needed to tell an intact
    // copy from a damaged one.
    let verdict = stored.as_deref().map(|obj| match object::read_header(obj) {
        Err(e @ ObjectError::UnsupportedVersion(_)) => Stored::Unreadable(e),
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
            tracing::info!(
                "{name} is already archived with identical content (sha256 {}); nothing to do",
                ours.sha256
            );
            Ok(())
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
            repo.put_replace(key, encoded).await
        }
        // Deleted between our create and our read (a prune): write it again.
        None => match repo.put_new(key, encoded).await? {
            Created::New => Ok(()),
            Created::AlreadyExists => Err(Error::io(format!(
                "{name} keeps changing in the repository while being archived; retry"
            ))),
        },
    }
}
