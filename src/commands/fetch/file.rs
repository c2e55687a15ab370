//! The per-file step of fetch: stream one object from the repository,
//! decode and verify it, and hand it over atomically.

use crate::error::{Context, Error, Result};
use crate::format::key::wal_key;
use crate::format::object::{self, Sha256Digest};
use crate::pg::wal::WalFileName;
use crate::repository::Repository;
use crate::sys::{Durability, write_atomically_with};
use std::path::{Path, PathBuf};

/// Fetches `name` from `repo` to `path`. `known`: the repository's
/// walvault.json was just read, so a missing object needs no second look.
pub(super) async fn fetch_from_repository(
    repo: &Repository,
    name: &WalFileName,
    path: &Path,
    known: bool,
) -> Result<()> {
    let opened = repo.open_object(&wal_key(name)).await?;
    deliver(repo, name, path, opened, known).await
}

/// Delivers `opened`, the object of `name` as `repo` holds it (`None`:
/// there is none), to `path`; `known` as for [`fetch_from_repository`].
pub(super) async fn deliver(
    repo: &Repository,
    name: &WalFileName,
    path: &Path,
    opened: Option<crate::store::ObjectReader>,
    known: bool,
) -> Result<()> {
    let key = wal_key(name);
    let Some(reader) = opened else {
        // Recovery asks for files that do not exist yet; that is "end of
        // archive", not a failure. A repository that is not there at all is.
        if !known {
            repo.require_config().await?;
        }
        return Err(Error::not_found(format!("{name} is not in the archive")));
    };
    // Decompressed straight into a temporary file beside `path`, hashed on
    // the way; renamed into place only once length and sha256 are proven.
    // Frames are decoded as they arrive, while the rest is still read. No
    // fsync: PostgreSQL makes a restored file durable itself when it keeps
    // it, and asks again after a crash.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let limit = limit_for(name);
    // Owned, so that the thread decoding a streamed object can use it too.
    let explain = {
        let (name, url, shown) = (*name, repo.url().to_string(), path.display().to_string());
        let key = key.clone();
        move |e: object::ObjectError| match e {
            object::ObjectError::Write(e) => Error::io(format!("cannot write {shown}: {e}")),
            object::ObjectError::Read(e) => Error::io(format!(
                "cannot read {key} in {url}: {e}; nothing was written to {shown}"
            )),
            object::ObjectError::Internal(e) => Error::io(format!(
                "fetching {name} failed: {e}; nothing was written to {shown}"
            )),
            // Not damage: a format this walvault does not know yet.
            e @ (object::ObjectError::UnsupportedVersion(_)
            | object::ObjectError::UnsupportedCompression(_)) => Error::corrupt(format!(
                "{name} in {url} ({key}) was written by a newer walvault: {e}; \
                 nothing was written to {shown}"
            )),
            e => Error::corrupt(format!(
                "{name} in {url} ({key}) is damaged: {e}; nothing was written to {shown}. \
                 Run 'walvault verify' and restore the object from another copy"
            )),
        }
    };
    // Room for the whole object up front, unless it is longer than any
    // object of this kind can be (then it is not read at all).
    let size = reader.size();
    if size > object::max_stored_len(limit) {
        return Err(explain(object::ObjectError::Corrupt(format!(
            "it is {size} bytes long, more than any object of at most {limit} bytes of content"
        ))));
    }
    let target = path.to_path_buf();
    let initial = bytes::BytesMut::with_capacity(size as usize);
    decode_streamed(reader, true, move |fill| {
        decode_in_place(&target, initial, fill, limit, workers, &explain)
    })
    .await
    .map_err(|e| Error::io(format!("decoding {name} failed: {e}")))??;
    tracing::debug!("restored {name} to {}", path.display());
    Ok(())
}

/// Runs `decode` with a fill over an object as the store delivers it (on
/// this thread where it can when `here`, see `ObjectReader::feed_here`); a
/// piece the store cannot deliver is a read error, not damage.
pub(super) async fn decode_streamed<T: Send + 'static>(
    reader: crate::store::ObjectReader,
    here: bool,
    decode: impl FnOnce(&mut object::Fill<'_>) -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    let decode = move |fill: &mut crate::store::Fill<'_>| {
        decode(&mut |buf: &mut bytes::BytesMut| fill(buf).map_err(object::ObjectError::Read))
    };
    match here {
        true => reader.feed_here(decode).await,
        false => reader.feed(decode).await,
    }
}

/// Decodes an object, as `fill` delivers it after `initial`, into a
/// temporary file beside `path`, and renames that into place only once
/// length and sha256 are proven.
pub(super) fn decode_in_place(
    path: &Path,
    initial: bytes::BytesMut,
    fill: &mut object::Fill<'_>,
    limit: u64,
    workers: usize,
    explain: &dyn Fn(object::ObjectError) -> Error,
) -> Result<()> {
    write_atomically_with(path, Some(0o600), Durability::Visible, |out| {
        object::decode_to_file_from(initial, fill, out, limit, workers)
            .map(drop)
            .map_err(explain)
    })
}

/// Segments are at most 1 GiB; every other WAL file is a few lines of text.
pub(super) fn limit_for(name: &WalFileName) -> u64 {
    match name.segment_with_header() {
        Some(_) => object::MAX_CONTENT,
        None => 16 << 20,
    }
}

/// Moves a prefetched copy of `name` to `path` after proving its sha256;
/// whether it did. `spooled` is the spool's listing for this repository.
/// The spool is only a shortcut: a copy that cannot be handed over, for
/// whatever reason, is deleted and the caller fetches from the repository.
pub(super) fn hand_over(
    spooled: &[(WalFileName, Sha256Digest, PathBuf)],
    name: &WalFileName,
    path: &Path,
) -> bool {
    let Some((_, sha, file)) = spooled.iter().find(|(n, _, _)| n == name) else {
        return false;
    };
    match move_verified(file, sha, path) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                "cannot hand over the prefetched copy of {name} ({e}); fetching it from the repository"
            );
            let _ = std::fs::remove_file(file);
            false
        }
    }
}

/// Puts the spooled `file` at `path` once it has proven to hash to `sha`:
/// a rename, or on another filesystem a copy, hashed as it is made and
/// renamed into place only if it matches.
pub(super) fn move_verified(file: &Path, sha: &Sha256Digest, path: &Path) -> Result<()> {
    let actual =
        Sha256Digest::of_file(file).context(|| format!("cannot read {}", file.display()))?;
    if actual != *sha {
        return Err(Error::corrupt(format!("{} is damaged", file.display())));
    }
    // No fsync, as in fetch_from_repository.
    match std::fs::rename(file, path) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {}
        Err(e) => {
            return Err(Error::io(format!(
                "cannot move {} to {}: {e}",
                file.display(),
                path.display()
            )));
        }
    }
    // The spool is on another filesystem.
    write_atomically_with(path, Some(0o600), Durability::Visible, |out| {
        let mut hashing = HashingReader {
            inner: std::fs::File::open(file)
                .context(|| format!("cannot read {}", file.display()))?,
            hasher: <sha2::Sha256 as sha2::Digest>::new(),
        };
        std::io::copy(&mut hashing, out)
            .context(|| format!("cannot copy {} to {}", file.display(), path.display()))?;
        let copied = Sha256Digest(sha2::Digest::finalize(hashing.hasher).into());
        if copied != *sha {
            return Err(Error::corrupt(format!(
                "{} changed while it was copied",
                file.display()
            )));
        }
        Ok(())
    })?;
    let _ = std::fs::remove_file(file);
    Ok(())
}

/// Hashes what is read through it.
pub(super) struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        sha2::Digest::update(&mut self.hasher, &buf[..n]);
        Ok(n)
    }
}
