//! The per-file worker: read a file in chunks, hash each chunk, store only the
//! chunks the repository lacks. Runs on blocking threads; memory per worker is
//! one chunk and its compressed form.

use super::walk::SourceFile;
use crate::error::{Error, Result};
use crate::format::manifest::CHUNK_SIZE;
use crate::format::manifest::FileEntry;
use crate::format::object::{self, Sha256Digest};
use crate::format::pack::{BlobIndex, PackWriter};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct CopyStats {
    pub deduplicated: AtomicU64,
}

pub struct CopyContext<'a> {
    pub index: &'a BlobIndex,
    pub packs: &'a PackWriter,
    pub level: i32,
    pub stats: &'a CopyStats,
    pub progress: &'a indicatif::ProgressBar,
}

/// Reads until `buf` is full or the file ends.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Stores one file. `None` when it vanished before we could open it: the
/// server dropped it, and WAL replay agrees.
pub fn copy_file(src: &SourceFile, ctx: &CopyContext) -> Result<Option<FileEntry>> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    if src.link_owner.is_some() {
        // Behind a link may now be a fifo: never block on opening it.
        std::os::unix::fs::OpenOptionsExt::custom_flags(
            &mut options,
            libc::O_NONBLOCK | libc::O_NOCTTY,
        );
    }
    let mut file = match options.open(&src.abs) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("cannot open {}: {e}", src.abs.display()))),
    };
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("cannot stat {}: {e}", src.abs.display())))?;
    if let Some(owner) = src.link_owner
        && (!meta.is_file() || std::os::unix::fs::MetadataExt::uid(&meta) != owner)
    {
        return Err(Error::io(format!(
            "{} is a symbolic link that no longer points to a regular file of the data \
             directory's owner; fix the link and run the backup again",
            src.abs.display()
        )));
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    let mtime = meta
        .modified()
        .map(chrono::DateTime::<chrono::Utc>::from)
        .unwrap_or_else(|_| chrono::Utc::now());

    let mut chunks = vec![];
    let mut size = 0u64;
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        // Files grow and shrink under a live server: copy what is there now.
        let n = read_full(&mut file, &mut buf)
            .map_err(|e| Error::io(format!("cannot read {}: {e}", src.abs.display())))?;
        if n == 0 && size > 0 {
            break;
        }
        let data = &buf[..n];
        size += n as u64;
        let sha = Sha256Digest::of(data);
        let chunk = match ctx.index.get(&sha) {
            Some(known) => {
                ctx.stats
                    .deduplicated
                    .fetch_add(n as u64, Ordering::Relaxed);
                known
            }
            None => {
                let encoded = object::encode_with_digest(data, sha, ctx.level).map_err(|e| {
                    Error::io(format!("cannot compress {}: {e}", src.abs.display()))
                })?;
                ctx.packs.append(sha, n as u64, &encoded)?
            }
        };
        chunks.push(chunk);
        ctx.progress.inc(n as u64);
        if n < CHUNK_SIZE {
            break;
        }
    }
    Ok(Some(FileEntry {
        path: src.path.clone(),
        size,
        mode,
        mtime,
        chunks_sha256: crate::format::manifest::chunks_sha256(&chunks),
        chunks,
    }))
}
