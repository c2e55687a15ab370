//! Where a restore puts things: empty directories of ours, tablespace
//! locations, modes, private files, and durability of the whole tree.

use crate::error::{Context, Error, Result};
use crate::format::manifest::Manifest;
use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Makes everything written under each directory durable (syncfs: one call
/// per filesystem, far cheaper than an fsync per file for thousands of files).
pub(super) fn sync_filesystems<'a>(dirs: impl Iterator<Item = &'a PathBuf>) -> Result<()> {
    for dir in dirs {
        let handle =
            std::fs::File::open(dir).context(|| format!("cannot open {}", dir.display()))?;
        if let Err(e) = crate::sys::syncfs(&handle) {
            return Err(Error::io(format!(
                "cannot sync the filesystem of {}: {e}",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// An empty directory of ours, created 0700 if missing; anything else is
/// refused. A directory another user owns is refused too: its owner could
/// plant links in it while the restore writes, and a restore run as root
/// would follow them.
pub(super) fn prepare_empty_dir(dir: &Path, what: &str) -> Result<PathBuf> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            check_owner(dir, &meta, what)?;
            let refuse_unless_empty = || -> Result<()> {
                let mut entries =
                    std::fs::read_dir(dir).context(|| format!("cannot read {}", dir.display()))?;
                if entries.next().is_some() {
                    return Err(Error::usage(format!(
                        "{what} {} is not empty; restore into an empty or new directory",
                        dir.display()
                    )));
                }
                Ok(())
            };
            refuse_unless_empty()?;
            // Closed, then checked again: nothing can have slipped in since.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .context(|| format!("cannot set mode of {}", dir.display()))?;
            refuse_unless_empty()?;
        }
        Ok(_) => {
            return Err(Error::usage(format!(
                "{what} {} exists and is not a directory",
                dir.display()
            )));
        }
        Err(_) => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .context(|| format!("cannot create {}", parent.display()))?;
            }
            // Made here, 0700 from the start, failing if anything appeared.
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .context(|| format!("cannot create {}", dir.display()))?;
        }
    }
    let resolved = dir
        .canonicalize()
        .context(|| format!("cannot resolve {}", dir.display()))?;
    // What the path leads to now must still be our own directory.
    let meta = std::fs::symlink_metadata(&resolved)
        .context(|| format!("cannot read {}", resolved.display()))?;
    if !meta.is_dir() {
        return Err(Error::usage(format!(
            "{what} {} changed while restore prepared it; restore into a directory only you can write",
            dir.display()
        )));
    }
    check_owner(&resolved, &meta, what)?;
    Ok(resolved)
}

pub(super) fn check_owner(dir: &Path, meta: &std::fs::Metadata, what: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let me = crate::sys::effective_uid();
    if meta.uid() != me {
        return Err(Error::usage(format!(
            "{what} {} belongs to uid {}, not to the user running restore (uid {me}); run restore as its owner or give a new directory",
            dir.display(),
            meta.uid()
        )));
    }
    Ok(())
}

/// A directory inside the restore (parents included), never reached through
/// a link: each component must be a real directory once made.
pub(super) fn make_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .context(|| format!("cannot create {}", dir.display()))?;
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        _ => Err(Error::usage(format!(
            "{} is not a directory of the restore (a link?); restore into a directory only you can write",
            dir.display()
        ))),
    }
}

/// Writes a file of the restored data directory atomically. Its temporary
/// file is created new and never through a link, so nothing planted under
/// its name is truncated or written through.
pub(super) fn write_private_file(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(Error::usage(format!(
            "'{}' is not a file path",
            path.display()
        )));
    };
    let tmp = dir.join(format!(
        ".{}.walvault-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .context(|| format!("cannot create {}", tmp.display()))?;
    let result = file
        .write_all(data)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path))
        .context(|| format!("cannot write {}", path.display()));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .context(|| format!("cannot fsync directory {}", dir.display()))
}

/// Where each tablespace goes: `--tablespace-map`, else where it was.
pub(super) fn tablespace_locations(
    manifest: &Manifest,
    pgdata: &Path,
    map: &[(u32, PathBuf)],
) -> Result<HashMap<u32, PathBuf>> {
    let mut out = HashMap::new();
    for t in &manifest.tablespaces {
        let mapped = map
            .iter()
            .find(|(oid, _)| *oid == t.oid)
            .map(|(_, p)| p.clone());
        let target = match mapped {
            Some(p) => p,
            None => unmapped_location(manifest, t, pgdata)?,
        };
        if !target.is_absolute() {
            return Err(Error::usage(format!(
                "tablespace {} location {} must be absolute",
                t.oid,
                target.display()
            )));
        }
        let target = prepare_empty_dir(&target, &format!("tablespace {} location", t.oid))?;
        if target.starts_with(pgdata) {
            return Err(Error::usage(format!(
                "tablespace {} location {} is inside the data directory; map it elsewhere with --tablespace-map {}=DIR",
                t.oid,
                target.display(),
                t.oid
            )));
        }
        out.insert(t.oid, target);
    }
    Ok(out)
}

/// A tablespace's recorded location, restored there without being asked only
/// when it lies beside the data directory (under its parent): the manifest is
/// data from the repository, and anywhere else it would make and fill a
/// directory wherever it says.
pub(super) fn unmapped_location(
    manifest: &Manifest,
    t: &crate::format::manifest::Tablespace,
    pgdata: &Path,
) -> Result<PathBuf> {
    use std::path::Component;
    let location = PathBuf::from(&t.location);
    let parent = pgdata.parent().filter(|p| p.parent().is_some());
    let beside = location.is_absolute()
        && location
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && parent.is_some_and(|p| location.starts_with(p));
    if beside {
        return Ok(location);
    }
    Err(Error::usage(format!(
        "backup {} has tablespace {} at {}, outside {}; say where it goes with --tablespace-map {}=DIR (its old path to restore it there)",
        manifest.id,
        t.oid,
        t.location.escape_debug(),
        parent.unwrap_or(pgdata).display(),
        t.oid
    )))
}

/// Files under `pg_tblspc/<oid>/` go to the tablespace's location; all others
/// under the data directory. Paths were checked by `Manifest::check_paths`.
pub(super) fn destination(pgdata: &Path, locations: &HashMap<u32, PathBuf>, path: &str) -> PathBuf {
    if let Some(rest) = path.strip_prefix("pg_tblspc/") {
        let (oid, inner) = rest.split_once('/').unwrap_or((rest, ""));
        if let Some(loc) = oid.parse().ok().and_then(|o: u32| locations.get(&o)) {
            return if inner.is_empty() {
                loc.clone()
            } else {
                loc.join(inner)
            };
        }
    }
    pgdata.join(path)
}

/// Directory modes as PostgreSQL makes them (0700, or 0750 with group
/// access): a manifest cannot ask for setuid, sticky or world bits.
pub fn dir_mode(mode: u32) -> u32 {
    (mode & 0o750) | 0o700
}

/// File modes likewise: 0600, or 0640 with group access.
pub fn file_mode(mode: u32) -> u32 {
    (mode & 0o640) | 0o600
}

/// Built from the checked tablespace list only, never from the manifest's
/// raw text: PostgreSQL makes a symlink for every line of it.
pub(super) fn tablespace_map_text(
    manifest: &Manifest,
    locations: &HashMap<u32, PathBuf>,
) -> Option<String> {
    if manifest.tablespaces.is_empty() {
        return None;
    }
    Some(
        manifest
            .tablespaces
            .iter()
            .map(|t| format!("{} {}\n", t.oid, locations[&t.oid].display()))
            .collect(),
    )
}
