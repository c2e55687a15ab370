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
use std::path::PathBuf;

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
        let first = std::process::id() as u64 * 1000;
        for n in first..first + 100 {
            let mut staging = dest.clone().into_os_string();
            staging.push(format!("#{n}"));
            let staging = PathBuf::from(staging);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
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
