//! The per-file worker of a restore: fetch each chunk by range, prove it is
//! the chunk the manifest names, write it, and prove the file's chunk list.
//!
//! Files are written with direct I/O where the filesystem allows it: a
//! restore writes each byte once and reads none back, so copying it through
//! the page cache only costs a copy of every byte (docs/design.md,
//! "Restore", has figures) and evicts what the host had cached.
//! What direct I/O cannot write (a file's unaligned tail, a filesystem
//! without it) is written through the page cache; the final syncfs makes
//! both durable.

use crate::error::{Error, ErrorKind, Result};
use crate::format::key::pack_key;
use crate::format::manifest::FileEntry;
use crate::format::object;
use crate::repository::Repository;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// The largest blob a backup writes: a 1 MiB chunk that did not compress,
/// plus header and zstd framing, with room to spare.
const MAX_BLOB_LEN: u64 = 2 << 20;

/// Direct I/O wants buffers, offsets and lengths aligned to the device's
/// logical block; 4 KiB covers every common one.
const ALIGN: usize = 4096;

/// The largest chunk a backup writes.
const MAX_CHUNK: usize = crate::format::manifest::CHUNK_SIZE;

/// Files smaller than this are written through the page cache: direct I/O
/// saves nothing on them.
const DIRECT_MIN: u64 = 64 << 10;

/// Cleared the first time the filesystem refuses direct I/O.
static DIRECT_IO: AtomicBool = AtomicBool::new(true);

/// A worker's chunk buffer, aligned for direct I/O and reused for every
/// chunk it restores.
pub struct ChunkBuffer {
    raw: Vec<u8>,
    start: usize,
}

impl ChunkBuffer {
    pub fn new() -> ChunkBuffer {
        let raw = vec![0u8; MAX_CHUNK + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        ChunkBuffer { raw, start }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + MAX_CHUNK]
    }
}

/// The file being restored, and whether it is still open for direct I/O.
struct Destination {
    file: std::fs::File,
    direct: bool,
}

impl Destination {
    fn create(path: &Path, size: u64) -> std::io::Result<Destination> {
        use std::os::unix::fs::OpenOptionsExt;
        let open = |direct: bool| {
            let mut options = std::fs::OpenOptions::new();
            // Never follow a link planted where a file should go.
            let flags = libc::O_NOFOLLOW | if direct { libc::O_DIRECT } else { 0 };
            options
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(flags)
                .open(path)
        };
        if size >= DIRECT_MIN && DIRECT_IO.load(Ordering::Relaxed) {
            match open(true) {
                Ok(file) => return Ok(Destination { file, direct: true }),
                // tmpfs and a few others refuse O_DIRECT at open.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    DIRECT_IO.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Destination {
            file: open(false)?,
            direct: false,
        })
    }

    /// Writes `data` at `offset`: directly while it is aligned, through the
    /// page cache from the first piece that is not (a file's last chunk).
    fn write_at(&mut self, data: &[u8], offset: u64) -> std::io::Result<()> {
        if self.direct {
            let aligned =
                if offset.is_multiple_of(ALIGN as u64) && data.as_ptr().align_offset(ALIGN) == 0 {
                    data.len() / ALIGN * ALIGN
                } else {
                    0
                };
            if aligned > 0 {
                match self.file.write_all_at(&data[..aligned], offset) {
                    Ok(()) => {
                        if aligned == data.len() {
                            return Ok(());
                        }
                        return self
                            .buffered()?
                            .write_all_at(&data[aligned..], offset + aligned as u64);
                    }
                    // Some filesystems accept O_DIRECT at open and refuse the write.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        DIRECT_IO.store(false, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        self.buffered()?.write_all_at(data, offset)
    }

    /// Turns direct I/O off for the rest of the file.
    fn buffered(&mut self) -> std::io::Result<&std::fs::File> {
        if self.direct {
            crate::sys::clear_direct_io(&self.file)?;
            self.direct = false;
        }
        Ok(&self.file)
    }
}

/// Runs on a blocking thread; `rt` drives the storage requests.
pub fn restore_file(
    repo: &Repository,
    rt: &tokio::runtime::Handle,
    entry: &FileEntry,
    dest: &Path,
    buffer: &mut ChunkBuffer,
) -> Result<u64> {
    let damaged = |why: String| {
        Error::corrupt(format!(
            "{} is damaged in the repository: {why}",
            entry.path
        ))
    };
    let mut file = Destination::create(dest, entry.size)
        .map_err(|e| Error::io(format!("cannot create {}: {e}", dest.display())))?;
    let mut size = 0u64;
    for chunk in &entry.chunks {
        let key = pack_key(&chunk.pack);
        let end = chunk
            .offset
            .checked_add(chunk.length)
            .filter(|_| (1..=MAX_BLOB_LEN).contains(&chunk.length))
            .ok_or_else(|| {
                damaged(format!(
                    "its manifest points at an impossible range of {key}"
                ))
            })?;
        let stored = match rt.block_on(repo.get_range(&key, chunk.offset..end)) {
            Ok(stored) => stored,
            // Stores answer a range past an object's end with an error of
            // their own, read as I/O; the truth is a manifest and a pack that
            // do not match: damage, not something a retry mends.
            Err(e) if e.kind == ErrorKind::Io => match rt.block_on(stored_size(repo, &key)) {
                Some(size) if end > size => {
                    return Err(damaged(format!(
                        "its manifest points at bytes {}..{end} of {key}, which holds {size}",
                        chunk.offset
                    )));
                }
                _ => return Err(e),
            },
            Err(e) => return Err(e),
        };
        let out = buffer.as_mut();
        let header = object::decode_to_slice(&stored, out, chunk.size)
            .map_err(|e| damaged(format!("chunk at {key}+{}: {e}", chunk.offset)))?;
        let data = &out[..header.length as usize];
        if header.sha256 != chunk.sha256 || data.len() as u64 != chunk.size {
            return Err(damaged(format!(
                "chunk at {key}+{} holds sha256 {}, the manifest expects {}",
                chunk.offset, header.sha256, chunk.sha256
            )));
        }
        file.write_at(data, size)
            .map_err(|e| Error::io(format!("cannot write {}: {e}", dest.display())))?;
        size += data.len() as u64;
    }
    // Every chunk was proven against its sha256; the manifest's file
    // identity proves the list of chunks is the one the backup wrote.
    if size != entry.size
        || crate::format::manifest::chunks_sha256(&entry.chunks) != entry.chunks_sha256
    {
        return Err(damaged(format!(
            "restored {size} bytes from {} chunks, the manifest expects {} bytes and other chunks",
            entry.chunks.len(),
            entry.size
        )));
    }
    // Durable at the end of the restore, all files at once (syncfs).
    use std::os::unix::fs::PermissionsExt;
    let file = file.file;
    file.set_permissions(std::fs::Permissions::from_mode(super::file_mode(
        entry.mode,
    )))
    .map_err(|e| Error::io(format!("cannot set mode of {}: {e}", dest.display())))?;
    let _ = file.set_modified(entry.mtime.into());
    Ok(size)
}

/// The size of a stored object, from a listing of its directory (bounded:
/// packs are spread over 256 of them); `None` when it cannot be told.
async fn stored_size(repo: &Repository, key: &crate::format::key::Key) -> Option<u64> {
    let (dir, _) = key.as_ref().rsplit_once('/')?;
    let listed = repo.list(dir).await.ok()?;
    listed
        .into_iter()
        .find(|meta| meta.key == *key)
        .map(|meta| meta.size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `chunks` the way restore does and reads the file back.
    fn written(path: &Path, chunks: &[usize]) -> (Vec<u8>, Vec<u8>) {
        let total: usize = chunks.iter().sum();
        let mut dest = Destination::create(path, total as u64).unwrap();
        let mut buffer = ChunkBuffer::new();
        let (mut expected, mut offset) = (vec![], 0u64);
        for (n, &len) in chunks.iter().enumerate() {
            let out = &mut buffer.as_mut()[..len];
            out.iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i * 7 + n) as u8);
            expected.extend_from_slice(out);
            dest.write_at(out, offset).unwrap();
            offset += len as u64;
        }
        drop(dest);
        (std::fs::read(path).unwrap(), expected)
    }

    #[test]
    fn files_come_back_whole_with_or_without_direct_io() {
        let mut dirs = vec![tempfile::tempdir().unwrap()];
        // tmpfs refuses O_DIRECT: the page cache path must take over.
        if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
            dirs.push(shm);
        }
        for dir in &dirs {
            for (n, chunks) in [
                vec![MAX_CHUNK, MAX_CHUNK],
                vec![MAX_CHUNK, 8192 * 3],
                vec![MAX_CHUNK, 5000],
                vec![100],
                vec![ALIGN + 1],
            ]
            .iter()
            .enumerate()
            {
                let (back, expected) = written(&dir.path().join(n.to_string()), chunks);
                assert!(back == expected, "{chunks:?} in {}", dir.path().display());
            }
        }
    }
}
