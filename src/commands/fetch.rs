//! `walvault fetch <name> <path>`: PostgreSQL's restore_command.

use crate::commands::write_file_atomically;
use crate::error::{Error, Result};
use crate::object;
use crate::repository::{RepoUrl, Repository, wal_key};
use crate::wal::WalFileName;
use std::path::PathBuf;

pub struct FetchOptions {
    /// `%f`: the file PostgreSQL asks for.
    pub name: String,
    /// `%p`: where to put it, relative to the working directory.
    pub path: PathBuf,
}

pub async fn run(url: &RepoUrl, opts: &FetchOptions) -> Result<()> {
    let name = WalFileName::parse(&opts.name).map_err(|e| Error::usage(e.to_string()))?;
    let repo = Repository::open(url, false)?;
    let key = wal_key(&name);
    let Some(stored) = repo.get(&key).await? else {
        // Recovery asks for files that do not exist yet; that is "end of
        // archive", not a failure. A repository that is not there at all is.
        repo.require_config().await?;
        return Err(Error::not_found(format!("{name} is not in the archive")));
    };
    // Segments are at most 1 GiB; every other WAL file is a few lines of text.
    let limit = match name.segment_with_header() {
        Some(_) => object::MAX_CONTENT,
        None => 16 << 20,
    };
    let (_, data) = object::decode_limited(&stored, limit).map_err(|e| {
        Error::corrupt(format!(
            "{name} in {} ({key}) is damaged: {e}; nothing was written to {}. \
             Run 'walvault verify' and restore the object from another copy",
            repo.url(),
            opts.path.display()
        ))
    })?;
    write_file_atomically(&opts.path, &data, Some(0o600))?;
    tracing::debug!("restored {name} to {}", opts.path.display());
    Ok(())
}
