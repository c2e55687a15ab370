//! The filesystem driver: a repository in a local directory.
//!
//! Objects are files under the root, written by object_store's
//! `LocalFileSystem` with fsync of the file and its directory. A push also
//! writes a segment straight into the repository while it is made: writing
//! each frame to its file as soon as it is ready, with writeback started at
//! once, leaves the final fsync little to wait for, instead of writing and
//! syncing the whole object after the last frame. The file is staged beside
//! its final name (`name#N`, which the store's listings skip, as for its own
//! uploads) and linked into place exactly as the store's create-only put
//! does: fsync the file, link (refused if the name exists), fsync the
//! directory.

use super::objects::{Objects, impl_store};
use super::{Created, ObjectInfo, ObjectReader, Payload, RepoUrl, Staging, task_failed};
use crate::error::{Error, Result};
use crate::format::key::Key;
use bytes::Bytes;
use object_store::local::LocalFileSystem;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
fn store_places(root: &Path) -> Vec<(PathBuf, usize)> {
    let mut places = vec![(root.to_path_buf(), 1)];
    for dir in [
        crate::format::key::WAL_DIR,
        crate::format::key::PACK_DIR,
        crate::format::key::BACKUP_DIR,
        crate::format::key::LOCKS_DIR,
        crate::format::key::CLUSTERS_DIR,
    ] {
        places.push((root.join(dir), usize::MAX));
    }
    places
}

/// A staged file: removed when dropped, linked to its name by
/// [`LocalStore::put_staged`].
pub(super) struct StagedFile {
    file: File,
    staging: PathBuf,
    dest: PathBuf,
}

impl StagedFile {
    pub(super) fn file(&self) -> &File {
        &self.file
    }

    /// What was written to it.
    pub(super) fn read_back(&self, key: &Key) -> Result<Bytes> {
        std::fs::read(&self.staging)
            .map(Bytes::from)
            .map_err(|e| Error::io(format!("cannot read back the staged {key}: {e}")))
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        // After a link this only drops the staging name.
        let _ = std::fs::remove_file(&self.staging);
    }
}

/// A repository in a local directory.
pub struct LocalStore {
    objects: Objects,
    root: PathBuf,
}

impl LocalStore {
    /// The repository at `root`, created when missing only if `create`.
    pub fn open(root: &Path, create: bool, url: &RepoUrl) -> Result<LocalStore> {
        if create {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(|e| {
                    Error::io(format!(
                        "cannot create repository directory {}: {e}",
                        root.display()
                    ))
                })?;
        } else if !root.is_dir() {
            return Err(Error::usage(format!(
                "repository directory {} does not exist; check --repo / WALVAULT_REPO",
                root.display()
            )));
        }
        let fs = LocalFileSystem::new_with_prefix(root)
            .map_err(|e| Error::io(format!("cannot open repository {}: {e}", root.display())))?
            .with_fsync(true)
            .with_automatic_cleanup(false);
        Ok(LocalStore {
            objects: Objects::new(Arc::new(fs), url),
            root: root.to_path_buf(),
        })
    }

    fn url(&self) -> &str {
        &self.objects.url
    }
}

impl_store!(LocalStore {

    /// The kernel refuses the hard link that makes an object when the name
    /// exists: nothing to prove first.
    async fn put_new(&self, key: &Key, data: Payload) -> Result<Created> {
        self.objects.put_create(key, data).await
    }

    /// A staged file for `key` when the directory for `key` exists already;
    /// in memory otherwise (then the object goes through the store's own put).
    fn stage(&self, key: &Key) -> Staging {
        Staging {
            file: stage_file(&self.root, key),
        }
    }

    /// Makes a complete staged object durable under `key`, unless something
    /// is there already; returns only once it is durable, like `put_new`.
    /// When the name is taken, the staged bytes come back.
    async fn put_staged(
        &self,
        key: &Key,
        staging: Staging,
        parts: Payload,
    ) -> Result<Option<Payload>> {
        let Some(staged) = staging.file else {
            return Ok(match self.put_new(key, parts.clone()).await? {
                Created::New => None,
                Created::AlreadyExists => Some(parts),
            });
        };
        let url = self.url().to_string();
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
                    return Ok(Some(Payload::from(Bytes::from(ours))));
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
        .map_err(task_failed)?
    }

    /// The push that stored it may have been killed after its link and
    /// before its fsyncs, and on a filesystem that does not order metadata
    /// after data (unlike ext4's default journal) the name could still
    /// vanish in a crash. So: the file, then its directory and each one
    /// above it up to the repository's root.
    async fn make_durable(&self, key: &Key) -> Result<()> {
        let (root, path) = (self.root.clone(), self.root.join(key.as_str()));
        let url = self.url().to_string();
        tokio::task::spawn_blocking(move || {
            let sync = |p: &Path| {
                std::fs::File::open(p)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::io(format!("cannot fsync {} in {url}: {e}", p.display())))
            };
            sync(&path)?;
            for dir in path.ancestors().skip(1) {
                sync(dir)?;
                if dir == root {
                    break;
                }
            }
            Ok(())
        })
        .await
        .map_err(task_failed)?
    }

    /// Staged files unwritten for [`LEFTOVER_AGE`]: what pushes and uploads
    /// killed mid-write left.
    async fn leftovers(&self) -> Result<Vec<Leftover>> {
        let (root, url) = (self.root.clone(), self.url().to_string());
        tokio::task::spawn_blocking(move || find_leftovers(&root, &url))
            .await
            .map_err(|e| Error::io(format!("looking for leftovers failed: {e}")))?
    }

    fn delete_leftover(&self, leftover: &Leftover) -> Result<()> {
        match std::fs::remove_file(&leftover.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(format!(
                "cannot delete {}: {e}",
                leftover.path.display()
            ))),
            _ => Ok(()),
        }
    }
});

fn stage_file(root: &Path, key: &Key) -> Option<StagedFile> {
    let dest = root.join(key.as_str());
    if !dest.parent()?.is_dir() {
        return None;
    }
    // Owner-only, or group-readable where the root grants its group
    // access: the same modes the store's own writes get.
    let mode = if grants_group(root) { 0o640 } else { 0o600 };
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
                return Some(StagedFile {
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

/// Whether the operator gave the repository's directory to a group: group
/// access and none for others. A plain `mkdir` under umask 022 (0755) grants
/// its group nothing on purpose, so it must not make the database readable
/// by whatever group the directory happens to have.
pub fn grants_group(root: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(root).is_ok_and(|m| {
        let mode = m.permissions().mode();
        mode & 0o070 != 0 && mode & 0o007 == 0
    })
}

fn find_leftovers(root: &Path, url: &str) -> Result<Vec<Leftover>> {
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

    /// Files of writes killed midway, in the repository's folders and in
    /// its clusters' folders after an upgrade; nothing else under the root.
    #[test]
    fn leftovers_are_found_in_every_cluster_folder() {
        let dir = tempfile::tempdir().unwrap();
        let old = SystemTime::now() - LEFTOVER_AGE - std::time::Duration::from_secs(60);
        let mut expected = vec![];
        for (path, leftover) in [
            ("wal/0000000100000000/000000010000000000000001.zst#7", true),
            (
                "clusters/16-42/wal/0000000100000000/000000010000000000000001.zst#8",
                true,
            ),
            ("clusters/16-42/packs/ab/abcd.pack#9", true),
            ("lost+found/x#1", false),
        ] {
            let full = dir.path().join(path);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(&full, b"x").unwrap();
            File::options()
                .write(true)
                .open(&full)
                .unwrap()
                .set_modified(old)
                .unwrap();
            if leftover {
                expected.push(full);
            }
        }
        let mut found: Vec<PathBuf> = find_leftovers(dir.path(), "test")
            .unwrap()
            .into_iter()
            .map(|l| l.path)
            .collect();
        found.sort();
        expected.sort();
        assert_eq!(found, expected);
    }

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
