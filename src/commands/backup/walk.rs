//! What a base backup copies from the data directory: what PostgreSQL's
//! documentation says a base backup holds ("Backing Up the Data Directory"),
//! the same list pg_basebackup uses.

use crate::error::{Error, Result};
use crate::format::manifest::{DirEntry, Tablespace};
use std::path::{Path, PathBuf};

/// Directories kept, empty: their contents are rebuilt or useless on restore.
const EMPTY_DIRS: &[&str] = &[
    "pg_wal",
    "pg_dynshmem",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
];

/// Files never copied, wherever they are.
const SKIP_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "pg_internal.init",
    "postgresql.auto.conf.tmp",
    "current_logfiles",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "recovery.signal",
    "standby.signal",
];

/// A file to copy.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Relative to the data directory, `/`-separated.
    pub path: String,
    pub abs: PathBuf,
    pub size: u64,
    /// For a symbolic link followed: whose regular file it must still be
    /// when opened (the link may change meanwhile).
    pub link_owner: Option<u32>,
}

pub struct Listing {
    pub directories: Vec<DirEntry>,
    pub files: Vec<SourceFile>,
    pub tablespaces: Vec<Tablespace>,
}

fn skipped_name(name: &str) -> bool {
    SKIP_FILES.contains(&name) || name.starts_with("pgsql_tmp")
}

fn mode_of(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

/// Lists the data directory (following `pg_tblspc` links into tablespaces).
/// Files that vanish while we look are normal on a live server.
pub fn list(pgdata: &Path) -> Result<Listing> {
    let meta = std::fs::metadata(pgdata).map_err(|e| {
        Error::usage(format!(
            "cannot read data directory {}: {e}",
            pgdata.display()
        ))
    })?;
    if !meta.is_dir() || !pgdata.join("PG_VERSION").exists() {
        return Err(Error::usage(format!(
            "{} is not a PostgreSQL data directory (no PG_VERSION); check --pgdata",
            pgdata.display()
        )));
    }
    let mut listing = Listing {
        directories: vec![],
        files: vec![],
        tablespaces: vec![],
    };
    let owner = std::os::unix::fs::MetadataExt::uid(&meta);
    walk_tree(pgdata, "", &mut listing, true, owner)?;
    // Tablespaces: pg_tblspc/<oid> is a link to the tablespace's location.
    let tblspc = pgdata.join("pg_tblspc");
    if let Ok(entries) = std::fs::read_dir(&tblspc) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let Ok(oid) = name.parse::<u32>() else {
                continue;
            };
            let link = entry.path();
            let rel = format!("pg_tblspc/{oid}");
            let location = match std::fs::read_link(&link) {
                Ok(target) => target,
                Err(_) => {
                    // An in-place tablespace: a directory inside the data directory.
                    if let Ok(meta) = std::fs::symlink_metadata(&link)
                        && meta.is_dir()
                    {
                        listing.directories.push(DirEntry {
                            path: rel.clone(),
                            mode: mode_of(&meta),
                        });
                        walk_tree(&link, &rel, &mut listing, false, owner)?;
                    }
                    continue;
                }
            };
            listing.tablespaces.push(Tablespace {
                oid,
                location: location.display().to_string(),
            });
            listing.directories.push(DirEntry {
                path: rel.clone(),
                mode: std::fs::metadata(&link)
                    .map(|m| mode_of(&m))
                    .unwrap_or(0o700),
            });
            walk_tree(&link, &rel, &mut listing, false, owner)?;
        }
    }
    listing.files.sort_by(|a, b| a.path.cmp(&b.path));
    listing.directories.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(listing)
}

/// `owner` is the data directory's owner: a link is followed only to a file
/// of theirs, so a link planted in the data directory cannot carry another
/// user's file (read with the backup's rights) into the repository.
fn walk_tree(
    root: &Path,
    prefix: &str,
    listing: &mut Listing,
    is_data_dir: bool,
    owner: u32,
) -> Result<()> {
    let join = |rel: &Path| -> String {
        let rel = rel.to_string_lossy();
        if prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{prefix}/{rel}")
        }
    };
    let mut walker = walkdir::WalkDir::new(root)
        .follow_links(false)
        .min_depth(1)
        .into_iter();
    while let Some(entry) = walker.next() {
        let entry = match entry {
            Ok(e) => e,
            Err(e) if e.io_error().map(|io| io.kind()) == Some(std::io::ErrorKind::NotFound) => {
                continue;
            }
            Err(e) => {
                return Err(Error::io(format!("cannot list {}: {e}", root.display())));
            }
        };
        let rel_path = entry
            .path()
            .strip_prefix(root)
            .expect("walkdir stays under root");
        let rel = join(rel_path);
        let name = entry.file_name().to_string_lossy();
        if skipped_name(&name) {
            if entry.file_type().is_dir() {
                walker.skip_current_dir();
            }
            continue;
        }
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(_) => continue, // vanished
        };
        let top_level = is_data_dir && entry.depth() == 1;
        if entry.file_type().is_dir() || (top_level && name == "pg_wal" && entry.path_is_symlink())
        {
            let mode = std::fs::metadata(entry.path())
                .map(|m| mode_of(&m))
                .unwrap_or(mode_of(&meta));
            listing.directories.push(DirEntry {
                path: rel.clone(),
                mode,
            });
            if top_level && EMPTY_DIRS.contains(&name.as_ref()) {
                if name == "pg_wal" {
                    listing.directories.push(DirEntry {
                        path: "pg_wal/archive_status".into(),
                        mode,
                    });
                }
                if entry.file_type().is_dir() {
                    walker.skip_current_dir();
                }
            } else if top_level && name == "pg_tblspc" {
                // Links handled by list(); nothing else belongs here.
                walker.skip_current_dir();
            }
            continue;
        }
        if entry.file_type().is_file() {
            listing.files.push(SourceFile {
                path: rel,
                abs: entry.path().to_path_buf(),
                size: meta.len(),
                link_owner: None,
            });
        } else if entry.file_type().is_symlink() {
            // A configuration file linked from elsewhere (postgresql.conf to
            // /etc, say) is part of the cluster: store its content, restored as
            // a regular file. Anything else behind a link cannot be stored.
            match std::fs::metadata(entry.path()) {
                Ok(target)
                    if target.is_file()
                        && std::os::unix::fs::MetadataExt::uid(&target) == owner =>
                {
                    tracing::info!(
                        "{rel} is a symbolic link; backing up the file it points to as a regular file"
                    );
                    listing.files.push(SourceFile {
                        path: rel,
                        abs: entry.path().to_path_buf(),
                        size: target.len(),
                        link_owner: Some(owner),
                    });
                }
                _ => tracing::warn!(
                    "{rel} is a symbolic link to {} (not a regular file of the data directory's \
                     owner): not backed up",
                    std::fs::read_link(entry.path())
                        .map(|t| t.display().to_string())
                        .unwrap_or_else(|_| "?".into())
                ),
            }
        }
        // Sockets, fifos and devices are not part of a cluster's state.
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_what_postgres_rebuilds() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        for f in [
            "PG_VERSION",
            "postmaster.pid",
            "base/1/1259",
            "base/1/pg_internal.init",
            "base/pgsql_tmp/pgsql_tmp1.0",
            "pg_wal/000000010000000000000001",
            "pg_wal/archive_status/000000010000000000000001.done",
            "pg_stat_tmp/global.stat",
            "global/pg_control",
        ] {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"x").unwrap();
        }
        let l = list(root).unwrap();
        let files: Vec<_> = l.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(files, ["PG_VERSION", "base/1/1259", "global/pg_control"]);
        let dirs: Vec<_> = l.directories.iter().map(|d| d.path.as_str()).collect();
        assert!(dirs.contains(&"pg_wal") && dirs.contains(&"pg_wal/archive_status"));
        assert!(dirs.contains(&"pg_stat_tmp"));
        assert!(!dirs.iter().any(|d| d.contains("pgsql_tmp")));
    }

    #[test]
    fn symlinked_files_are_backed_up_as_their_content() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("data");
        std::fs::create_dir_all(root.join("base")).unwrap();
        std::fs::write(root.join("PG_VERSION"), b"15").unwrap();
        let etc = d.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("postgresql.conf"), b"shared_buffers = 1GB\n").unwrap();
        std::os::unix::fs::symlink(etc.join("postgresql.conf"), root.join("postgresql.conf"))
            .unwrap();
        std::os::unix::fs::symlink(d.path().join("nowhere"), root.join("base/dangling")).unwrap();
        let l = list(&root).unwrap();
        let conf = l
            .files
            .iter()
            .find(|f| f.path == "postgresql.conf")
            .expect("a symlinked postgresql.conf is backed up");
        assert_eq!(conf.size, 21);
        assert!(!l.files.iter().any(|f| f.path == "base/dangling"));
        // Someone else's file behind a link is not carried into the repository.
        let someone_else = 4_000_000;
        if std::os::unix::fs::chown(etc.join("postgresql.conf"), Some(someone_else), None).is_ok() {
            let l = list(&root).unwrap();
            assert!(!l.files.iter().any(|f| f.path == "postgresql.conf"));
        }
    }
}
