//! The spool: walvault's own scratch space beside pg_wal, for records of
//! segments pushed ahead and for segments fetched ahead.
//!
//! Nothing here is trusted on its own. A push record is honoured only while
//! the file it describes is unchanged (same inode, size, times and sha256),
//! and it is written only after the object is durable. A prefetched segment
//! carries its sha256 in its name and is re-hashed before it is handed over.

use crate::error::{Context, Result};
use crate::object::Sha256Digest;
use crate::wal::WalFileName;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub struct Spool {
    dir: PathBuf,
}

/// What a file looked like when it was pushed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    sha256: String,
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata, sha256: &Sha256Digest) -> FileIdentity {
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            sha256: sha256.to_hex(),
        }
    }
}

impl Spool {
    /// `explicit`, else `pg_wal/walvault-spool` when `%p` lies in pg_wal (as
    /// PostgreSQL passes it); else none, and nothing is done ahead.
    pub fn locate(explicit: Option<&Path>, wal_path: &Path) -> Option<Spool> {
        if let Some(dir) = explicit {
            return Some(Spool {
                dir: dir.to_path_buf(),
            });
        }
        let parent = wal_path.parent()?;
        (parent.file_name()? == "pg_wal").then(|| Spool {
            dir: parent.join("walvault-spool"),
        })
    }

    fn pushed_dir(&self) -> PathBuf {
        self.dir.join("pushed")
    }

    fn prefetch_dir(&self) -> PathBuf {
        self.dir.join("prefetch")
    }

    /// The repository's segment size, remembered so that a fetch served from
    /// the spool needs no request to know which segments come next.
    pub fn segment_size(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("wal_segment_size"))
            .ok()?
            .trim()
            .parse()
            .ok()
            .filter(|s: &u32| s.is_power_of_two())
    }

    pub fn remember_segment_size(&self, size: u32) {
        let _ = std::fs::create_dir_all(&self.dir);
        let _ = crate::commands::write_file_atomically(
            &self.dir.join("wal_segment_size"),
            size.to_string().as_bytes(),
            Some(0o600),
        );
    }

    /// Records that `name`, as the file `identity` describes, is durably stored.
    pub fn record_pushed(&self, name: &WalFileName, identity: &FileIdentity) -> Result<()> {
        let dir = self.pushed_dir();
        std::fs::create_dir_all(&dir).context(|| format!("cannot create {}", dir.display()))?;
        let json = serde_json::to_vec(identity).expect("serializes");
        crate::commands::write_file_atomically(
            &dir.join(format!("{name}.json")),
            &json,
            Some(0o600),
        )
    }

    /// The record for `name`, if any.
    pub fn pushed(&self, name: &WalFileName) -> Option<FileIdentity> {
        let bytes = std::fs::read(self.pushed_dir().join(format!("{name}.json"))).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn forget_pushed(&self, name: &WalFileName) {
        let _ = std::fs::remove_file(self.pushed_dir().join(format!("{name}.json")));
    }

    /// Drops records whose segment is no longer in `wal_dir` (archived and
    /// recycled): they can never be asked for again.
    pub fn prune_pushed(&self, wal_dir: &Path) {
        let Ok(entries) = std::fs::read_dir(self.pushed_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().to_string();
            let Some(name) = file.strip_suffix(".json") else {
                continue;
            };
            if !wal_dir.join(name).exists() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Prefetched segments as `(name, expected sha256, path)`.
    pub fn prefetched(&self) -> Vec<(WalFileName, Sha256Digest, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(self.prefetch_dir()) else {
            return vec![];
        };
        entries
            .flatten()
            .filter_map(|e| {
                let file = e.file_name().to_string_lossy().to_string();
                let (name, sha) = file.split_once('.')?;
                Some((
                    WalFileName::parse(name).ok()?,
                    Sha256Digest::from_hex(sha)?,
                    e.path(),
                ))
            })
            .collect()
    }

    /// Removes everything in the prefetch folder that `keep` does not want,
    /// including leftovers of interrupted downloads.
    pub fn discard_prefetched(&self, keep: impl Fn(&WalFileName) -> bool) {
        let Ok(entries) = std::fs::read_dir(self.prefetch_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().to_string();
            let wanted = file
                .split_once('.')
                .filter(|(_, sha)| Sha256Digest::from_hex(sha).is_some())
                .and_then(|(name, _)| WalFileName::parse(name).ok())
                .is_some_and(|n| keep(&n));
            if !wanted {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Stores a verified segment for a later fetch.
    pub fn store_prefetched(
        &self,
        name: &WalFileName,
        sha256: &Sha256Digest,
        data: &[u8],
    ) -> Result<()> {
        let dir = self.prefetch_dir();
        std::fs::create_dir_all(&dir).context(|| format!("cannot create {}", dir.display()))?;
        // Not synced: a copy torn by a crash fails the sha256 check at hand-over.
        crate::commands::write_atomically_with(
            &dir.join(format!("{name}.{}", sha256.to_hex())),
            Some(0o600),
            crate::commands::Durability::Visible,
            |file| {
                std::io::Write::write_all(file, data)
                    .context(|| format!("cannot write into {}", dir.display()))
            },
        )
    }
}
