//! The per-file step of push: read, check, compress and store one WAL file,
//! and settle what is already stored under its name.

use crate::ahead::spool::{RepoBinding, metadata_key};
use crate::error::{Context, Error, Result};
use crate::format::key::{Key, wal_key};
use crate::format::object::Sha256Digest;
use crate::format::object::{self, ObjectError, ObjectHeader};
use crate::pg::wal::{SegmentHeader, WalFileName};
use crate::repository::{Created, RepoUrl, Repository, RepositoryConfig};
use crate::store::Payload;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

pub(super) fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// Runs `f` and says whether `path` kept its identity (device, inode, size, times)
/// meanwhile: the metadata afterwards if so.
pub(super) fn while_unchanged<T>(
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

pub(super) fn sha256_of_file(path: &Path) -> Result<Sha256Digest> {
    Sha256Digest::of_file(path).context(|| format!("cannot read {}", path.display()))
}

/// Pushes files into one repository, checking the cluster once.
pub(super) struct Pusher {
    /// The repository's root (where its walvault.json is).
    pub(super) repo: Repository,
    level: i32,
    bound: tokio::sync::OnceCell<Bound>,
}

/// The cluster archiving into the repository now, once checked: its own
/// config, and the repository as it sees it (its folder, after an upgrade).
struct Bound {
    config: RepositoryConfig,
    /// The repository's own walvault.json: it knows the clusters before.
    root: RepositoryConfig,
    repo: Repository,
}

impl Bound {
    fn of(root_repo: &Repository, root: &RepositoryConfig) -> Bound {
        Bound {
            config: root.current_cluster(),
            root: root.clone(),
            repo: root_repo.view(root.current_namespace()),
        }
    }
}

pub(super) struct Pushed {
    pub(super) header: ObjectHeader,
    pub(super) stored: usize,
    /// The repository held this content already; nothing new was stored.
    pub(super) already: bool,
    /// The file's metadata, when it did not change while it was read.
    pub(super) unchanged: Option<std::fs::Metadata>,
}

impl Pusher {
    /// `config`: the repository's walvault.json when it was just read (its
    /// cluster is still checked against every segment).
    pub(super) fn new(
        url: &RepoUrl,
        level: i32,
        config: Option<RepositoryConfig>,
    ) -> Result<Pusher> {
        let repo = Repository::open(url, true)?;
        let bound = config.map(|root| Bound::of(&repo, &root));
        Ok(Pusher {
            repo,
            level,
            bound: tokio::sync::OnceCell::new_with(bound),
        })
    }

    /// The binding of the repository as this pusher found it (once it has
    /// checked a segment's cluster against it).
    pub(super) fn binding(&self) -> Option<RepoBinding> {
        self.bound
            .get()
            .map(|b| RepoBinding::of(self.repo.url(), &b.config))
    }

    /// Pushes one file, compressing its frames on `workers` threads.
    pub(super) async fn push(
        &self,
        name: &WalFileName,
        path: &Path,
        workers: usize,
    ) -> Result<Pushed> {
        let cannot_read =
            |e: std::io::Error| Error::io(format!("cannot read {}: {e}", path.display()));
        let mut file = std::fs::File::open(path).map_err(cannot_read)?;
        let len = file.metadata().map_err(cannot_read)?.len();
        let mut head = vec![0u8; 8192.min(len as usize)];
        file.read_exact(&mut head).map_err(cannot_read)?;
        // Where the file goes: the folder of the cluster archiving now.
        let mut into = &self.repo;
        if let Some(cluster) = cluster_of_segment(name, path, &head, len)? {
            let bound = self
                .bound
                .get_or_try_init(|| async {
                    let root = self.repo.bind_cluster(&cluster).await?;
                    Ok::<_, Error>(Bound::of(&self.repo, &root))
                })
                .await?;
            bound.root.check_same_cluster(&cluster, self.repo.url())?;
            into = &bound.repo;
        } else {
            // History and backup history files go to the cluster archiving
            // now, wherever they are pushed from. A repository not bound yet
            // takes them as they are: after a restore into a new repository,
            // the new timeline's history file is archived first.
            let bound = match self.bound.get() {
                Some(b) => Some(b),
                None => match self.repo.config().await? {
                    Some(root) => Some(
                        self.bound
                            .get_or_init(|| async { Bound::of(&self.repo, &root) })
                            .await,
                    ),
                    None => None,
                },
            };
            if let Some(b) = bound {
                into = &b.repo;
            }
            if let Some(ours) = cluster_of_data_directory(path)?
                && let Some(bound) = bound
                    .map(|b| &b.config)
                    .filter(|b| b.system_identifier != ours)
            {
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
        let staging = into.stage(&key);
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
        let taken = into.put_staged(&key, staging, encoded.parts).await?;
        let already = match taken {
            Some(ours) => settle_existing(into, name, &key, header, ours).await?,
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
        format: crate::repository::ONE_CLUSTER_FORMAT,
        system_identifier: header.system_identifier.to_string(),
        pg_version: header.pg_version(),
        wal_segment_size: header.segment_size,
        created_at: chrono::Utc::now(),
        upgrades: Vec::new(),
    }))
}

/// The cluster whose `pg_wal` holds `path`, from its control file.
/// History and backup history files carry no cluster identity of their own;
/// the cluster archiving them does.
fn cluster_of_data_directory(path: &Path) -> Result<Option<String>> {
    crate::pg::cluster::system_identifier_beside(path).map_err(|(control, e)| {
        Error::io(format!(
            "cannot read {} to check which cluster {} comes from: {e}; nothing was archived",
            control.display(),
            path.display()
        ))
    })
}
