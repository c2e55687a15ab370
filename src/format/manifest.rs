//! The backup manifest: what a backup holds and where its content lives
//! (docs/format.md, "Backups"). Written last, it is what makes a backup exist.

use crate::error::{Error, Result};
use crate::format::object::Sha256Digest;
use crate::pg::lsn::Lsn;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::path::{Component, Path, PathBuf};

pub const MANIFEST_FORMAT: u32 = 1;

/// Chunk size for file content: relation segments are cut in 1 MiB pieces,
/// small enough that a changed page re-stores little, large enough that the
/// blob index stays small.
pub const CHUNK_SIZE: usize = 1 << 20;

mod sha_hex {
    use crate::format::object::Sha256Digest;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(d: &Sha256Digest, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.to_hex())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Sha256Digest, D::Error> {
        let s = String::deserialize(d)?;
        Sha256Digest::from_hex(&s).ok_or_else(|| serde::de::Error::custom("bad sha256"))
    }
}

/// One piece of a file's content: a blob inside a pack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// sha256 of the chunk's original bytes: the blob's identity.
    #[serde(with = "sha_hex")]
    pub sha256: Sha256Digest,
    /// Original length.
    pub size: u64,
    pub pack: String,
    /// Where the blob's object starts in the pack, and how long it is.
    pub offset: u64,
    pub length: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the data directory, `/`-separated.
    pub path: String,
    pub size: u64,
    pub mode: u32,
    pub mtime: DateTime<Utc>,
    /// sha256 of the chunks' sha256 digests, in order: the file's identity,
    /// had without hashing its bytes a second time.
    #[serde(with = "sha_hex")]
    pub chunks_sha256: Sha256Digest,
    pub chunks: Vec<ChunkRef>,
}

/// [`FileEntry::chunks_sha256`] for a list of chunks.
pub fn chunks_sha256(chunks: &[ChunkRef]) -> Sha256Digest {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for c in chunks {
        h.update(c.sha256.0);
    }
    Sha256Digest(h.finalize().into())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub path: String,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tablespace {
    pub oid: u32,
    /// Where the tablespace lived on the backed-up server.
    pub location: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStats {
    /// Bytes of all files.
    pub size: u64,
    /// Bytes this backup added to the repository (after dedup and compression).
    pub stored: u64,
    /// Bytes of content already in the repository, not stored again.
    pub deduplicated: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    /// `server_version_num`, e.g. 150018.
    pub pg_version: u32,
    pub system_identifier: String,
    pub wal_segment_size: u32,
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    pub start_time: DateTime<Utc>,
    pub stop_time: DateTime<Utc>,
    pub backup_label: String,
    pub tablespace_map: Option<String>,
    pub tablespaces: Vec<Tablespace>,
    pub directories: Vec<DirEntry>,
    pub files: Vec<FileEntry>,
    pub stats: BackupStats,
}

impl Manifest {
    pub fn from_json(bytes: &[u8], what: &str) -> Result<Manifest> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| Error::corrupt(format!("manifest of {what} is unreadable: {e}")))?;
        if m.format > MANIFEST_FORMAT {
            return Err(Error::usage(format!(
                "manifest of {what} has format {}, this walvault reads up to {MANIFEST_FORMAT}; upgrade walvault",
                m.format
            )));
        }
        Ok(m)
    }

    /// Every path a restore would write, checked before anything is written.
    pub fn check_paths(&self) -> Result<()> {
        for p in self
            .directories
            .iter()
            .map(|d| &d.path)
            .chain(self.files.iter().map(|f| &f.path))
        {
            safe_relative_path(p)?;
        }
        for t in &self.tablespaces {
            if !Path::new(&t.location).is_absolute() {
                return Err(Error::corrupt(format!(
                    "backup {} names tablespace {} at relative location '{}'; refusing it",
                    self.id, t.oid, t.location
                )));
            }
        }
        Ok(())
    }
}

/// A manifest path as a relative path with only normal components: no
/// absolute paths, no `..`, no `.`, nothing empty.
pub fn safe_relative_path(p: &str) -> Result<PathBuf> {
    let refuse = || {
        Error::corrupt(format!(
            "manifest path '{}' is absolute or leaves the data directory; refusing the whole backup",
            p.escape_debug()
        ))
    };
    if p.is_empty() || p.starts_with('/') || p.contains('\0') || p.contains('\\') {
        return Err(refuse());
    }
    let path = PathBuf::from(p);
    if p.split('/').any(|c| c.is_empty() || c == "." || c == "..")
        || !path.components().all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(refuse());
    }
    Ok(path)
}

/// A backup id: its start time, sortable as text.
pub fn backup_id(start: DateTime<Utc>) -> String {
    start.format("%Y%m%dT%H%M%SZ").to_string()
}

pub fn is_backup_id(s: &str) -> bool {
    s.len() == 16
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 => b == b'T',
            15 => b == b'Z',
            _ => b.is_ascii_digit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        for good in [
            "base/1/1259",
            "PG_VERSION",
            "pg_tblspc/16385/PG_15_202209061/5/16386",
        ] {
            assert!(safe_relative_path(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "base/../../x",
            "a//b",
            "./a",
            "a/.",
            "a\\b",
            "a/",
        ] {
            assert!(safe_relative_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids() {
        let t = DateTime::parse_from_rfc3339("2026-11-27T15:34:44Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(backup_id(t), "20261127T153444Z");
        assert!(is_backup_id("20261127T153444Z"));
        assert!(!is_backup_id("../20261127T1534"));
    }

    #[test]
    fn lsn_serde() {
        let l: Lsn = serde_json::from_str("\"16/B374D848\"").unwrap();
        assert_eq!(l, Lsn(0x16_B374_D848));
        assert_eq!(serde_json::to_string(&l).unwrap(), "\"16/B374D848\"");
    }
}
