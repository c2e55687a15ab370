//! The per-file worker of a restore: fetch each chunk by range, prove it is
//! the chunk the manifest names, write it, and prove the file's chunk list.

use crate::error::{Error, Result};
use crate::manifest::FileEntry;
use crate::object;
use crate::repository::{Repository, pack_key};
use std::io::Write;
use std::path::Path;

/// The largest blob a backup writes: a 1 MiB chunk that did not compress,
/// plus header and zstd framing, with room to spare.
const MAX_BLOB_LEN: u64 = 2 << 20;

/// Runs on a blocking thread; `rt` drives the storage requests.
pub fn restore_file(
    repo: &Repository,
    rt: &tokio::runtime::Handle,
    entry: &FileEntry,
    dest: &Path,
) -> Result<u64> {
    let damaged = |why: String| {
        Error::corrupt(format!(
            "{} is damaged in the repository: {why}",
            entry.path
        ))
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Never follow a link planted where a file should go.
        options.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    }
    let mut file = options
        .open(dest)
        .map_err(|e| Error::io(format!("cannot create {}: {e}", dest.display())))?;
    let mut size = 0u64;
    for chunk in &entry.chunks {
        let key = pack_key(&chunk.pack);
        let end = chunk
            .offset
            .checked_add(chunk.length)
            .filter(|_| chunk.length <= MAX_BLOB_LEN)
            .ok_or_else(|| {
                damaged(format!(
                    "its manifest points at an impossible range of {key}"
                ))
            })?;
        let stored = rt.block_on(repo.get_range(&key, chunk.offset..end))?;
        let (header, data) = object::decode_limited(&stored, chunk.size)
            .map_err(|e| damaged(format!("chunk at {key}+{}: {e}", chunk.offset)))?;
        if header.sha256 != chunk.sha256 || data.len() as u64 != chunk.size {
            return Err(damaged(format!(
                "chunk at {key}+{} holds sha256 {}, the manifest expects {}",
                chunk.offset, header.sha256, chunk.sha256
            )));
        }
        size += data.len() as u64;
        file.write_all(&data)
            .map_err(|e| Error::io(format!("cannot write {}: {e}", dest.display())))?;
    }
    // Every chunk was proven against its sha256; the manifest's file
    // identity proves the list of chunks is the one the backup wrote.
    if size != entry.size || crate::manifest::chunks_sha256(&entry.chunks) != entry.chunks_sha256 {
        return Err(damaged(format!(
            "restored {size} bytes from {} chunks, the manifest expects {} bytes and other chunks",
            entry.chunks.len(),
            entry.size
        )));
    }
    // Durable at the end of the restore, all files at once (syncfs).
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(super::file_mode(
        entry.mode,
    )))
    .map_err(|e| Error::io(format!("cannot set mode of {}: {e}", dest.display())))?;
    let _ = file.set_modified(entry.mtime.into());
    Ok(size)
}
