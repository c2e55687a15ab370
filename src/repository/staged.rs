//! Objects written straight into a local repository while they are made.
//!
//! A push compresses a segment frame by frame; writing each frame to its
//! file as soon as it is ready, with writeback started at once, leaves the
//! final fsync little to wait for, instead of writing and syncing the whole
//! object after the last frame. The file is staged beside its final name
//! (`name#N`, which the store's listings skip, as for its own uploads) and
//! linked into place exactly as the store's create-only put does: fsync the
//! file, link (refused if the name exists), fsync the directory.

use super::{Key, Repository};
use crate::error::{Error, Result};
use bytes::Bytes;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// How long a staged file must have gone unwritten before it counts as
/// left behind: a live push writes its own every few milliseconds, and one
/// stalled longer than this fails its link and is retried by PostgreSQL.
pub const LEFTOVER_AGE: Duration = Duration::from_secs(3600);

/// A staged file whose write was killed before the link: never an object,
/// never listed, only taking space.
pub struct Leftover {
    pub path: PathBuf,
    pub size: u64,
}

/// `name#N`: the staging names of walvault and of the store's own uploads,
/// by the store's own rule (digits after the first `#`, which its listings
/// skip), and never without a name before it.
fn is_staging_name(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .and_then(|n| n.split_once('#'))
        .is_some_and(|(base, n)| {
            !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
        })
}

/// Where the store writes: files at the root, and the trees of the
/// directories walvault keeps. Nothing else under the root is looked at (a
/// mount point's root-only `lost+found`, say).
fn store_places(root: &std::path::Path) -> Vec<(PathBuf, usize)> {
    let mut places = vec![(root.to_path_buf(), 1)];
    for dir in [
        crate::format::key::WAL_DIR,
        crate::format::key::PACK_DIR,
        crate::format::key::BACKUP_DIR,
        crate::format::key::LOCKS_DIR,
    ] {
        places.push((root.join(dir), usize::MAX));
    }
    places
}

/// A staged file: removed when dropped, linked to its name by
/// [`Repository::put_staged`].
pub struct StagedObject {
    file: File,
    staging: PathBuf,
    dest: PathBuf,
}

impl StagedObject {
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Drop for StagedObject {
    fn drop(&mut self) {
        // After a link this only drops the staging name.
        let _ = std::fs::remove_file(&self.staging);
    }
}

impl Repository {
    /// A staged file for `key` when the repository is a local directory
    /// whose directory for `key` exists already; `None` otherwise (then the
    /// object goes through the store's own put).
    pub fn stage(&self, key: &Key) -> Option<StagedObject> {
        let root = self.local_root()?;
        let dest = root.join(key.as_ref());
        if !dest.parent()?.is_dir() {
            return None;
        }
        // Owner-only, or group-readable where the root grants its group
        // access: the same modes the store's own writes get.
        let mode = if super::grants_group(root) {
            0o640
        } else {
            0o600
        };
        let first = std::process::id() as u64 * 1000;
        for n in first..first + 100 {
            let mut staging = dest.clone().into_os_string();
            staging.push(format!("#{n}"));
            let staging = PathBuf::from(staging);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&staging)
            {
                Ok(file) => {
                    return Some(StagedObject {
                        file,
                        staging,
                        dest,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(_) => return None,
            }
        }
        None
    }

    /// Staged files unwritten for [`LEFTOVER_AGE`] in a local repository:
    /// what pushes and uploads killed mid-write left. None on S3, where
    /// every object is one PUT that stores all of it or nothing.
    pub async fn leftovers(&self) -> Result<Vec<Leftover>> {
        let Some(root) = self.local_root() else {
            return Ok(vec![]);
        };
        let (root, url) = (root.to_path_buf(), self.url.to_string());
        tokio::task::spawn_blocking(move || find_leftovers(&root, &url))
            .await
            .map_err(|e| Error::io(format!("looking for leftovers failed: {e}")))?
    }

    /// Deletes a leftover; one already gone is fine.
    pub fn delete_leftover(&self, leftover: &Leftover) -> Result<()> {
        match std::fs::remove_file(&leftover.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(format!(
                "cannot delete {}: {e}",
                leftover.path.display()
            ))),
            _ => Ok(()),
        }
    }

    /// Makes a complete staged object durable under `key`, unless something
    /// is there already; returns only once it is durable, like `put_new`.
    /// When the name is taken, the staged bytes come back, for the caller
    /// to compare with what is there.
    pub async fn put_staged(&self, key: &Key, staged: StagedObject) -> Result<Option<Bytes>> {
        let url = self.url.to_string();
        let key = key.to_string();
        tokio::task::spawn_blocking(move || {
            let failed = |what: &str, e: std::io::Error| {
                Error::io(format!("cannot write {key} in {url}: {what}: {e}"))
            };
            staged.file.sync_all().map_err(|e| failed("fsync", e))?;
            match std::fs::hard_link(&staged.staging, &staged.dest) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let ours =
                        std::fs::read(&staged.staging).map_err(|e| failed("reading it back", e))?;
                    return Ok(Some(Bytes::from(ours)));
                }
                Err(e) => return Err(failed("link", e)),
            }
            let dir = staged.dest.parent().expect("staged in a directory");
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| failed("fsync of its directory", e))?;
            Ok(None)
        })
        .await
        .map_err(|e| Error::io(format!("storage task failed: {e}")))?
    }
}

fn find_leftovers(root: &std::path::Path, url: &str) -> Result<Vec<Leftover>> {
    use std::os::unix::fs::MetadataExt;
    let failed =
        |e: &dyn std::fmt::Display| Error::io(format!("cannot look for leftovers in {url}: {e}"));
    let now = SystemTime::now();
    let mut found = vec![];
    // Pushes go on meanwhile: a staged file (or a directory) that is gone by
    // the time we look at it was linked and removed, not left.
    let gone = |e: &walkdir::Error| {
        e.io_error()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    };
    for (dir, depth) in store_places(root) {
        if !dir.is_dir() {
            continue;
        }
        for entry in walkdir::WalkDir::new(&dir).max_depth(depth) {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(failed(&e)),
            };
            if !entry.file_type().is_file() || !is_staging_name(entry.file_name()) {
                continue;
            }
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(failed(&e)),
            };
            let idle = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            if idle >= LEFTOVER_AGE {
                found.push(Leftover {
                    path: entry.into_path(),
                    // A push killed right after its link leaves a second name
                    // of a live object: deleting it frees nothing.
                    size: if meta.nlink() > 1 { 0 } else { meta.len() },
                });
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_staging_names_are_leftovers() {
        for name in ["000000010000000000000001.zst#4242000", "a.pack#7"] {
            assert!(is_staging_name(name.as_ref()), "{name}");
        }
        for name in [
            "000000010000000000000001.zst",
            "#12",
            "a#",
            "a#1b",
            "x#1#2",
            "walvault.json",
        ] {
            assert!(!is_staging_name(name.as_ref()), "{name}");
        }
    }
}
