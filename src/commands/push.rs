//! `walvault push <path> <name>`: PostgreSQL's archive_command.

use crate::error::{Context, Error, Result};
use crate::object::{self, ObjectError, ObjectHeader};
use crate::repository::{Created, RepoUrl, Repository, RepositoryConfig, wal_key};
use crate::wal::{SegmentHeader, WalFileName};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct PushOptions {
    /// `%p`: the file, relative to the working directory (the data directory).
    pub path: PathBuf,
    /// `%f`: the name PostgreSQL archives it under.
    pub name: String,
    pub compress_level: i32,
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
    let data =
        std::fs::read(&opts.path).context(|| format!("cannot read {}", opts.path.display()))?;
    let cluster = cluster_of_segment(&name, &opts.path, &data)?;

    let repo = Repository::open(url, true)?;
    if let Some(cluster) = &cluster {
        repo.bind_cluster(cluster).await?;
    }
    let (header, encoded) = object::encode(&data, opts.compress_level)
        .context(|| format!("cannot compress {}", opts.path.display()))?;
    let stored_len = encoded.len();
    let encoded = bytes::Bytes::from(encoded);
    let key = wal_key(&name);
    match repo.put_new(&key, encoded.clone()).await? {
        Created::New => {
            tracing::info!(
                "archived {name} ({} bytes, stored {} bytes, {} ms)",
                data.len(),
                stored_len,
                started.elapsed().as_millis()
            );
            Ok(())
        }
        Created::AlreadyExists => settle_existing(&repo, &name, &key, header, encoded).await,
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
