//! One module per command; each takes its options as a plain struct so the
//! CLI layer stays argument parsing only.

pub mod backup;
pub mod check;
pub mod drill;
pub mod fetch;
pub mod list;
pub mod prune;
pub mod push;
pub mod restore;
pub mod status;
pub mod verify;

use crate::error::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Writes `data` at `path` so that `path` either does not exist or holds all
/// of it, durably: a temporary file in the same directory, fsync, rename,
/// fsync of the directory. A killed process leaves at most a stray temporary.
pub fn write_file_atomically(path: &Path, data: &[u8], mode: Option<u32>) -> Result<()> {
    write_bytes(path, data, mode, Durability::Durable)
}

/// Like [`write_file_atomically`], fsyncing only if `durability` asks.
pub fn write_bytes(
    path: &Path,
    data: &[u8],
    mode: Option<u32>,
    durability: Durability,
) -> Result<()> {
    write_atomically_with(path, mode, durability, |file| {
        file.write_all(data)
            .context(|| format!("cannot write {}", path.display()))
    })
}

/// Whether a file written atomically must also survive a crash.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync of the file and of its directory before returning.
    Durable,
    /// All or nothing for readers, no fsync: for files whose reader makes
    /// them durable itself or checks them before use. PostgreSQL fsyncs a
    /// restored segment when it keeps it (durable_rename) and fetches it
    /// again after a crash; a prefetched copy is re-hashed before hand-over.
    /// On this machine's disk the fsync of a 16 MiB segment is a third of a
    /// fetch.
    Visible,
}

/// Like [`write_file_atomically`], with `fill` writing the content: only if
/// it succeeds is the file (synced, if `durability` asks) renamed into place.
pub fn write_atomically_with(
    path: &Path,
    mode: Option<u32>,
    durability: Durability,
    fill: impl FnOnce(&mut std::fs::File) -> Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        crate::error::Error::usage(format!("'{}' is not a file path", path.display()))
    })?;
    let tmp = dir.join(format!(
        ".{}.walvault-{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode.unwrap_or(0o600));
        }
        let mut file = options
            .open(&tmp)
            .context(|| format!("cannot create {}", tmp.display()))?;
        fill(&mut file)?;
        if durability == Durability::Visible {
            return std::fs::rename(&tmp, path)
                .context(|| format!("cannot rename {} to {}", tmp.display(), path.display()));
        }
        file.sync_all()
            .context(|| format!("cannot fsync {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .context(|| format!("cannot fsync directory {}", dir.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Starts `walvault <args>` as a background worker unless one of its kind
/// already runs: its own process group (a signal to the command that starts
/// it does not reach it), its lock as stdin, no stdout, stderr to its log in
/// the spool.
/// The starting command returns at once, so PostgreSQL never waits for it.
/// Failing to start one is only a warning: the work is then done on demand.
/// `args` follow `walvault --repo URL <worker verb> --spool DIR`.
pub fn spawn_worker(
    spool: &crate::spool::Spool,
    kind: crate::spool::WorkerKind,
    url: &crate::repository::RepoUrl,
    args: &[std::ffi::OsString],
) {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    // Taken here and handed over as the worker's stdin (see
    // `Spool::inherited_worker_lock`); if it is held, a worker runs already.
    let Some(lock) = spool.lock_worker(kind) else {
        return;
    };
    let started = (|| -> std::io::Result<()> {
        let log = std::fs::File::create(spool.worker_log(kind))?;
        let dir = std::path::absolute(spool.dir())?;
        let mut command = std::process::Command::new(std::env::current_exe()?);
        if kind == crate::spool::WorkerKind::Push {
            // The push worker runs behind PostgreSQL: under load, the
            // archiver's own calls waited in the CPU queue behind its threads
            // (half the time between two calls in a drain). At nice 10 it
            // still gets a share, and every idle cycle; calls wait only for
            // pushes it has under way. The prefetch worker is not lowered:
            // recovery waits on every segment it has claimed.
            // SAFETY: between fork and exec this only calls setpriority(2),
            // which is async-signal-safe and touches no memory.
            unsafe {
                command.pre_exec(|| {
                    libc::setpriority(libc::PRIO_PROCESS, 0, 10);
                    Ok(())
                });
            }
        }
        command
            .arg("--repo")
            .arg(url.to_string())
            .arg(kind.verb())
            .arg("--spool")
            .arg(dir)
            .args(args)
            .stdin(Stdio::from(lock))
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()?;
        Ok(())
    })();
    if let Err(e) = started {
        tracing::warn!("cannot start the background {kind:?} worker ({e}); continuing without it");
    }
}
