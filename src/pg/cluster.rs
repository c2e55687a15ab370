//! Which cluster a data directory holds, read from its files (the server
//! may be stopped): the system identifier from `global/pg_control`, and the
//! major version and WAL segment size from the newest segment in `pg_wal`,
//! whose first page header records them with the system identifier again.

use crate::pg::wal::{SegmentHeader, WalFileName};
use std::io::Read;
use std::path::Path;

/// What binds a cluster to a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterIdentity {
    pub system_identifier: String,
    pub pg_version: u32,
    pub wal_segment_size: u32,
}

/// The cluster whose data directory is `pgdata`; the error says what is
/// missing or what disagrees.
pub fn identify(pgdata: &Path) -> Result<ClusterIdentity, String> {
    let control = pgdata.join("global/pg_control");
    let system_identifier = read_system_identifier(&control).map_err(|e| {
        format!(
            "cannot read {}: {e}; is {} a PostgreSQL data directory?",
            control.display(),
            pgdata.display()
        )
    })?;
    let wal = pgdata.join("pg_wal");
    let entries =
        std::fs::read_dir(&wal).map_err(|e| format!("cannot read {}: {e}", wal.display()))?;
    let mut segments: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            matches!(WalFileName::parse(&name), Ok(WalFileName::Segment(_))).then_some(name)
        })
        .collect();
    // Newest first; a segment made ahead of use (zero-filled) has no header
    // yet, so the newest one that has is read.
    segments.sort_unstable_by(|a, b| b.cmp(a));
    let mut first_error = None;
    let mut found = None;
    for name in &segments {
        let path = wal.join(name);
        let mut page = vec![0u8; crate::pg::wal::LONG_PAGE_HEADER_SIZE];
        let read = std::fs::File::open(&path)
            .and_then(|mut f| f.read_exact(&mut page))
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
            .and_then(|()| {
                SegmentHeader::parse(&page).map_err(|e| format!("{}: {e}", path.display()))
            });
        match read {
            Ok(header) => {
                found = Some((path, header));
                break;
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let Some((path, header)) = found else {
        return Err(first_error.unwrap_or_else(|| {
            format!(
                "{} holds no WAL segment to read the cluster's version from",
                wal.display()
            )
        }));
    };
    if header.system_identifier != system_identifier {
        return Err(format!(
            "{} says system identifier {system_identifier} but {} was written by {}: \
             the data directory is not one cluster's",
            control.display(),
            path.display(),
            header.system_identifier
        ));
    }
    Ok(ClusterIdentity {
        system_identifier: system_identifier.to_string(),
        pg_version: header.pg_version(),
        wal_segment_size: header.segment_size,
    })
}

/// The system identifier in the control file of the data directory whose
/// `pg_wal` holds `path` (as PostgreSQL passes `%p`, relative to the data
/// directory it runs the command in); `None` when `path` is not in a
/// `pg_wal` or there is no control file beside it. The error names the
/// control file.
pub fn system_identifier_beside(
    path: &Path,
) -> Result<Option<String>, (std::path::PathBuf, std::io::Error)> {
    let Some(wal_dir) = path
        .parent()
        .filter(|p| p.file_name() == Some("pg_wal".as_ref()))
    else {
        return Ok(None);
    };
    let control = wal_dir
        .parent()
        .unwrap_or(Path::new(""))
        .join("global/pg_control");
    match read_system_identifier(&control) {
        Ok(id) => Ok((id != 0).then(|| id.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err((control, e)),
    }
}

/// The system identifier in the control file `control`.
fn read_system_identifier(control: &Path) -> std::io::Result<u64> {
    let mut head = [0u8; 8];
    std::fs::File::open(control).and_then(|mut f| f.read_exact(&mut head))?;
    // ControlFileData begins with the system identifier, in every version.
    Ok(u64::from_le_bytes(head))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_directory(sysid: u64, segment_sysid: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("global")).unwrap();
        std::fs::create_dir_all(dir.path().join("pg_wal")).unwrap();
        let mut control = sysid.to_le_bytes().to_vec();
        control.resize(8192, 0);
        std::fs::write(dir.path().join("global/pg_control"), control).unwrap();
        let mut page = vec![0u8; 8192];
        page[0..2].copy_from_slice(&0xD113u16.to_le_bytes());
        page[2..4].copy_from_slice(&2u16.to_le_bytes());
        page[4..8].copy_from_slice(&1u32.to_le_bytes());
        page[24..32].copy_from_slice(&segment_sysid.to_le_bytes());
        page[32..36].copy_from_slice(&(1u32 << 20).to_le_bytes());
        page[36..40].copy_from_slice(&8192u32.to_le_bytes());
        std::fs::write(dir.path().join("pg_wal/000000010000000000000003"), page).unwrap();
        std::fs::write(
            dir.path()
                .join("pg_wal/000000010000000000000002.00000028.backup"),
            b"x",
        )
        .unwrap();
        dir
    }

    #[test]
    fn reads_the_identifier_version_and_segment_size() {
        let dir = data_directory(7_000_000_000_000_000_001, 7_000_000_000_000_000_001);
        assert_eq!(
            identify(dir.path()),
            Ok(ClusterIdentity {
                system_identifier: "7000000000000000001".into(),
                pg_version: 16,
                wal_segment_size: 1 << 20,
            })
        );
    }

    /// PostgreSQL makes segments ahead of use, zero-filled: the newest one
    /// with a header speaks for the cluster.
    #[test]
    fn skips_a_segment_made_ahead_of_use() {
        let dir = data_directory(7, 7);
        std::fs::write(
            dir.path().join("pg_wal/000000010000000000000004"),
            vec![0u8; 8192],
        )
        .unwrap();
        assert_eq!(identify(dir.path()).unwrap().pg_version, 16);
        std::fs::remove_file(dir.path().join("pg_wal/000000010000000000000003")).unwrap();
        assert!(
            identify(dir.path())
                .unwrap_err()
                .contains("000000010000000000000004")
        );
    }

    #[test]
    fn refuses_what_disagrees_or_is_missing() {
        let dir = data_directory(7, 8);
        assert!(
            identify(dir.path())
                .unwrap_err()
                .contains("not one cluster's")
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(
            identify(empty.path())
                .unwrap_err()
                .contains("PostgreSQL data directory")
        );
    }
}
