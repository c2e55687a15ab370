//! Object keys: where each kind of content lives in a repository
//! (docs/format.md, "Layout").

use crate::format::object::Sha256Digest;
use crate::pg::wal::WalFileName;

/// The name of an object in a repository: `/`-separated parts, relative to
/// the repository's root. Every store driver maps it to its own names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Key(String);

impl Key {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The `/`-separated parts, without empty ones.
    pub fn parts(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|p| !p.is_empty())
    }

    /// The last part, if there is one.
    pub fn filename(&self) -> Option<&str> {
        self.parts().last()
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Key {
        Key(s.to_string())
    }
}

impl From<String> for Key {
    fn from(s: String) -> Key {
        Key(s)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub const WAL_DIR: &str = "wal";
pub const BACKUP_DIR: &str = "backups";
pub const PACK_DIR: &str = "packs";
pub const LOCKS_DIR: &str = "locks";
/// Where later clusters' folders are: `clusters/<major>-<system identifier>`,
/// each laid out like a repository of one cluster.
pub const CLUSTERS_DIR: &str = "clusters";

/// `walvault.json`: the repository's format version and cluster binding.
pub const CONFIG_KEY: &str = "walvault.json";
/// `retention.json`: what the last prune kept, for fetch and verify.
pub const RETENTION_KEY: &str = "retention.json";

/// Where the proof is remembered (docs/format.md, "Layout").
pub const PROBE_RECORD_KEY: &str = "locks/create-only.json";
/// The probe objects, one per probing process, deleted after the probe.
pub const PROBE_PREFIX: &str = "locks/create-only-probe-";

/// `locks/create-only-probe-<pid>-<nanoseconds>`: one probing process's object.
pub fn probe_key(pid: u32, nanos: i64) -> Key {
    Key::from(format!("{PROBE_PREFIX}{pid}-{nanos}"))
}

/// The repository lock, backup markers, leases and takeover records.
pub const LOCK_KEY: &str = "locks/repository.lock.json";
pub const MARKER_PREFIX: &str = "locks/backup-";
pub const LEASE_PREFIX: &str = "locks/lease-";
pub const TAKEOVER_PREFIX: &str = "locks/takeover-";

/// `backups/<id>/manifest.json.zst`: written last, it is what makes a backup exist.
pub fn manifest_key(backup_id: &str) -> Key {
    Key::from(format!("{BACKUP_DIR}/{backup_id}/manifest.json.zst"))
}

/// The backup id a manifest key names, if it names one.
pub fn backup_id_of_key(key: &Key) -> Option<String> {
    let mut parts = key.parts();
    let (Some(dir), Some(id), Some(file), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    (dir == BACKUP_DIR && file == "manifest.json.zst" && crate::format::manifest::is_backup_id(id))
        .then(|| id.to_string())
}

/// `packs/<first two hex digits>/<pack id>.pack`: 256 folders keep listings short.
pub fn pack_key(pack_id: &str) -> Key {
    Key::from(format!("{PACK_DIR}/{}/{pack_id}.pack", &pack_id[..2]))
}

/// A pack id is 32 lower-case hex digits.
pub fn is_pack_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `wal/<timeline+log>/<name>.zst` for segment-bound files: one folder per
/// 4 GiB of WAL keeps listings short on every store. `wal/<TTTTTTTT>.history.zst`
/// for timeline history files.
pub fn wal_key(name: &WalFileName) -> Key {
    match name {
        WalFileName::TimelineHistory(_) => Key::from(format!("{WAL_DIR}/{name}.zst")),
        WalFileName::Segment(s) | WalFileName::Partial(s) | WalFileName::BackupHistory(s, _) => {
            Key::from(format!(
                "{WAL_DIR}/{:08X}{:08X}/{name}.zst",
                s.timeline, s.log
            ))
        }
    }
}

/// The WAL file a key under `wal/` names, if it names one.
pub fn wal_name_of_key(key: &Key) -> Option<WalFileName> {
    let file = key.filename()?.strip_suffix(".zst")?;
    let name = WalFileName::parse(file).ok()?;
    (wal_key(&name) == *key).then_some(name)
}

/// Tokens come from stored objects: hashed, they are always a safe key.
pub fn lease_key(token: &str) -> Key {
    Key::from(format!(
        "{LEASE_PREFIX}{}.json",
        &Sha256Digest::of(token.as_bytes()).to_hex()[..32]
    ))
}

pub fn takeover_key(judged: &[u8]) -> Key {
    Key::from(format!(
        "{TAKEOVER_PREFIX}{}.json",
        &Sha256Digest::of(judged).to_hex()[..32]
    ))
}

/// `locks/backup-<id>.json`: a backup in progress.
pub fn marker_key(backup_id: &str) -> Key {
    Key::from(format!("{MARKER_PREFIX}{backup_id}.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let seg = WalFileName::parse("000000020000000A000000FF").unwrap();
        assert_eq!(
            wal_key(&seg).as_ref(),
            "wal/000000020000000A/000000020000000A000000FF.zst"
        );
        let hist = WalFileName::parse("00000002.history").unwrap();
        assert_eq!(wal_key(&hist).as_ref(), "wal/00000002.history.zst");
        assert_eq!(wal_name_of_key(&wal_key(&seg)), Some(seg));
        assert_eq!(wal_name_of_key(&wal_key(&hist)), Some(hist));
        assert_eq!(
            wal_name_of_key(&Key::from("wal/x/000000020000000A000000FF.zst")),
            None
        );
    }
}
