//! Files written all or nothing, durably when asked, and the temporaries an
//! interrupted write leaves behind.

use super::process_exists;
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
    /// An fsync of a whole segment can cost as much as the rest of a fetch.
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
    let tmp = dir.join(temporary_name(
        &file_name.to_string_lossy(),
        std::process::id(),
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

/// The temporary through which process `pid` writes `file_name`
/// ([`write_atomically_with`]); a process killed by a signal leaves it behind.
fn temporary_name(file_name: &str, pid: u32) -> String {
    format!(".{file_name}.walvault-{pid}.tmp")
}

/// The pid in a name [`temporary_name`] made, if `name` is exactly such a name.
fn temporary_owner(name: &str) -> Option<u32> {
    let (file_name, pid) = name
        .strip_prefix('.')?
        .strip_suffix(".tmp")?
        .rsplit_once(".walvault-")?;
    let valid_pid = !pid.is_empty() && pid.len() <= 10 && pid.bytes().all(|b| b.is_ascii_digit());
    if file_name.is_empty() || !valid_pid {
        return None;
    }
    pid.parse().ok().filter(|&p| p > 0 && p <= i32::MAX as u32)
}

/// Removes from `dir` the temporaries of [`write_atomically_with`] whose
/// writer no longer exists: a write ended by a signal leaves one behind (up
/// to a whole segment in pg_wal), and nothing else ever would remove it.
/// Only regular files named exactly like one go, never a symlink or anything
/// else; a temporary whose pid is alive (or reused) stays. Best effort:
/// returns how many were removed.
pub fn remove_abandoned_temporaries(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temporary_owner) else {
            continue;
        };
        let regular = entry.file_type().is_ok_and(|t| t.is_file());
        if !regular || process_exists(pid) {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => {
                tracing::info!(
                    "removed {}, left behind by an interrupted walvault (pid {pid})",
                    entry.path().display()
                );
                removed += 1;
            }
            Err(e) => tracing::debug!("cannot remove {}: {e}", entry.path().display()),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid no process has: one that existed and was reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_exists(pid));
        pid
    }

    #[test]
    fn temporary_names_round_trip_and_nothing_else_matches() {
        let name = temporary_name("RECOVERYXLOG", 4242);
        assert_eq!(name, ".RECOVERYXLOG.walvault-4242.tmp");
        assert_eq!(temporary_owner(&name), Some(4242));
        for other in [
            "RECOVERYXLOG.walvault-4242.tmp",
            ".RECOVERYXLOG.walvault-4242.tmp.x",
            ".RECOVERYXLOG.walvault-.tmp",
            ".RECOVERYXLOG.walvault-42a.tmp",
            ".RECOVERYXLOG.walvault--1.tmp",
            ".RECOVERYXLOG.walvault-0.tmp",
            ".RECOVERYXLOG.walvault-99999999999.tmp",
            "..walvault-4242.tmp",
            "000000010000000000000001",
            ".RECOVERYXLOG.tmp",
        ] {
            assert_eq!(temporary_owner(other), None, "{other}");
        }
    }

    #[test]
    fn abandoned_temporaries_go_and_everything_else_stays() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let dead = dead_pid();
        let alive = std::process::id();
        let abandoned = d.join(temporary_name("RECOVERYXLOG", dead));
        let in_use = d.join(temporary_name("RECOVERYXLOG", alive));
        let other_file = d.join("000000010000000000000001");
        let look_alike = d.join(format!(".RECOVERYXLOG.walvault-{dead}.tmp.keep"));
        std::fs::write(&abandoned, b"half a segment").unwrap();
        std::fs::write(&in_use, b"being written").unwrap();
        std::fs::write(&other_file, b"wal").unwrap();
        std::fs::write(&look_alike, b"x").unwrap();
        // A symlink and a directory named like abandoned temporaries, and
        // the file the symlink points at, stay.
        let target = d.join("target");
        std::fs::write(&target, b"precious").unwrap();
        let link = d.join(temporary_name("LINK", dead));
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let sub = d.join(temporary_name("DIR", dead));
        std::fs::create_dir(&sub).unwrap();

        assert_eq!(remove_abandoned_temporaries(d), 1);
        assert!(!abandoned.exists());
        for kept in [&in_use, &other_file, &look_alike, &target, &sub] {
            assert!(kept.exists(), "{}", kept.display());
        }
        assert!(link.symlink_metadata().is_ok());
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        // Nothing to do in a directory that does not exist.
        assert_eq!(remove_abandoned_temporaries(&d.join("missing")), 0);
    }

    #[test]
    fn a_failed_write_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("RECOVERYXLOG");
        let failed = write_atomically_with(&path, None, Durability::Visible, |_| {
            Err(crate::error::Error::io("disk full"))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
