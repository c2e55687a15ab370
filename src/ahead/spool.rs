//! The spool: walvault's own scratch space beside pg_wal, for records of
//! segments pushed ahead and for segments fetched ahead.
//!
//! Nothing here is trusted on its own. A push record is honoured only while
//! the file it describes is unchanged (same inode, size, times and sha256),
//! and it is written only after the object is durable. A prefetched segment
//! carries its sha256 in its name and is re-hashed before it is handed over.
//! Both speak for one repository only: each carries its [`RepoBinding`] in
//! its name, so a record made for one repository is never taken as proof
//! for another, nor a copy fetched from one handed over for another.

use crate::error::{Context, Result};
use crate::format::object::Sha256Digest;
use crate::pg::wal::WalFileName;
use crate::repository::{RepoUrl, Repository, RepositoryConfig};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub struct Spool {
    dir: PathBuf,
}

/// How long a prefetch worker's reading of walvault.json speaks for the
/// repository at its URL: a repository replaced at the same place within
/// this time could have copies of the old one handed over (each still proven
/// by its sha256 against the object it was fetched from).
pub const REPOSITORY_RECORD_AGE: std::time::Duration = std::time::Duration::from_secs(120);

/// The repository a spool entry speaks for: where it is (its URL, written
/// in one normal form, and for S3 the endpoint) and which repository is
/// there (the cluster and creation time in its walvault.json, so one
/// recreated or mounted at the same place is another). Kept as a hex
/// digest, part of the name of each entry made for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoBinding(String);

impl RepoBinding {
    /// The binding of the cluster archiving now in the repository at `url`
    /// whose config is `config` (a root config or one cluster's own).
    pub fn of(url: &RepoUrl, config: &RepositoryConfig) -> RepoBinding {
        let config = &config.current_cluster();
        let place = Self::place(url);
        let text = format!(
            "walvault spool binding 1\n{place}\n{}\n{}\n",
            config.system_identifier,
            config
                .created_at
                .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
        );
        RepoBinding(Sha256Digest::of(text.as_bytes()).to_hex()[..32].to_string())
    }

    /// Where the repository is: its URL in one normal form, and for S3 the
    /// endpoint.
    fn place(url: &RepoUrl) -> String {
        match url {
            RepoUrl::Local(path) => {
                let normal: PathBuf = path.components().collect();
                format!("file://{}", normal.display())
            }
            RepoUrl::S3 { .. } => {
                // The same bucket name on another endpoint is another store.
                let endpoint = ["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
                    .iter()
                    .find_map(|k| std::env::var(k).ok())
                    .unwrap_or_default();
                format!("{url} at {}", endpoint.trim_end_matches('/'))
            }
        }
    }

    /// The binding of the repository as it is now; `None` when it has no
    /// walvault.json yet (nothing in any spool can speak for it then).
    pub async fn read(repo: &Repository) -> Result<Option<RepoBinding>> {
        Ok(repo
            .config()
            .await?
            .map(|config| RepoBinding::of(repo.url(), &config)))
    }

    /// Whether `text` has the form of a binding's key.
    fn is_key(text: &str) -> bool {
        text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

/// The two kinds of background worker; each has its own lock, claims and
/// log in the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerKind {
    Push,
    Prefetch,
}

impl WorkerKind {
    /// The hidden subcommand that runs this worker.
    pub fn verb(self) -> &'static str {
        match self {
            WorkerKind::Push => "push-ahead",
            WorkerKind::Prefetch => "fetch-ahead",
        }
    }

    fn stem(self) -> &'static str {
        match self {
            WorkerKind::Push => "push-worker",
            WorkerKind::Prefetch => "prefetch-worker",
        }
    }
}

/// What a file looked like when it was pushed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    sha256: String,
    /// Wall-clock time (ns since the epoch) before the pushed bytes were
    /// read; absent in records of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    read_from_ns: Option<i64>,
}

/// How much older than the read a file's ctime must be for its metadata
/// alone to prove it unchanged later: more than the coarsest timestamps a
/// Linux filesystem keeps (whole seconds on ext4 with small inodes).
const SETTLED: i64 = 2_000_000_000;

fn epoch_ns(t: std::time::SystemTime) -> Option<i64> {
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(d.as_nanos()).ok()
}

/// Whether `path` lies on a local filesystem whose timestamps the kernel
/// itself keeps (ext4, xfs, btrfs, tmpfs, zfs, f2fs, bcachefs). A network
/// filesystem may answer stat from a cache that is seconds old, so there a
/// record is always checked by re-hashing.
pub fn local_timestamps(path: &Path) -> bool {
    const LOCAL: [i64; 7] = [
        0xEF53,     // ext2/3/4
        0x58465342, // xfs
        0x9123683E, // btrfs
        0x01021994, // tmpfs
        0x2FC12FC1, // zfs
        0xF2F52010, // f2fs
        0xCA451A4E, // bcachefs
    ];
    crate::sys::filesystem_type(path).is_ok_and(|kind| LOCAL.contains(&kind))
}

/// What changes whenever a file is replaced or written: device, inode,
/// size, mtime and ctime (ns).
pub fn metadata_key(meta: &std::fs::Metadata) -> (u64, u64, u64, i64, i64) {
    (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
    )
}

impl FileIdentity {
    /// `meta` as it was after reading the file, which began at `read_from`.
    pub fn of(
        meta: &std::fs::Metadata,
        sha256: &Sha256Digest,
        read_from: std::time::SystemTime,
    ) -> FileIdentity {
        let (dev, ino, size, mtime_ns, ctime_ns) = metadata_key(meta);
        FileIdentity {
            dev,
            ino,
            size,
            mtime_ns,
            ctime_ns,
            sha256: sha256.to_hex(),
            read_from_ns: epoch_ns(read_from),
        }
    }

    fn same_metadata(&self, meta: &std::fs::Metadata) -> bool {
        (self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns) == metadata_key(meta)
    }

    /// Whether the file `meta` describes, whose content hashes to `sha256`,
    /// is the one recorded.
    pub fn matches(&self, meta: &std::fs::Metadata, sha256: &Sha256Digest) -> bool {
        self.same_metadata(meta) && self.sha256 == sha256.to_hex()
    }

    /// Whether `meta` alone proves the file is still what was pushed, with
    /// no need to read it again (git's answer to "racily clean" files).
    /// Every write sets ctime to the current time, which no one can set
    /// back. The recorded ctime was older than the read by more than any
    /// timestamp granularity, so a write after the read, or during it,
    /// leaves a newer ctime than recorded. A clock set back since the record
    /// was made voids that argument: then the caller reads the file again.
    pub fn unchanged_by_metadata(
        &self,
        meta: &std::fs::Metadata,
        now: std::time::SystemTime,
    ) -> bool {
        let (Some(read_from), Some(now)) = (self.read_from_ns, epoch_ns(now)) else {
            return false;
        };
        self.same_metadata(meta) && self.ctime_ns + SETTLED < read_from && read_from <= now
    }
}

impl Spool {
    /// `explicit`, else `pg_wal/walvault-spool` when `%p` lies in pg_wal (as
    /// PostgreSQL passes it); else none, and nothing is done ahead.
    pub fn locate(explicit: Option<&Path>, wal_path: &Path) -> Option<Spool> {
        if let Some(dir) = explicit {
            return Some(Spool {
                dir: dir.to_path_buf(),
            });
        }
        let parent = wal_path.parent()?;
        (parent.file_name()? == "pg_wal").then(|| Spool {
            dir: parent.join("walvault-spool"),
        })
    }

    /// The spool at `dir` (a worker is told where its parent's spool is).
    pub fn at(dir: &Path) -> Spool {
        Spool {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn worker_file(&self, kind: WorkerKind, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", kind.stem()))
    }

    /// The worker's lock, if no other worker of this kind holds it. Held for
    /// the worker's life; the kernel releases it however the worker ends, so
    /// a crashed worker never blocks the next one.
    pub fn lock_worker(&self, kind: WorkerKind) -> Option<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(&self.dir).ok()?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.worker_file(kind, "lock"))
            .ok()?;
        file.try_lock().ok()?;
        Some(file)
    }

    /// The lock a worker runs under: the one it was started with, else
    /// (started by hand) its own, if no other worker of its kind holds it.
    pub fn worker_lock(&self, kind: WorkerKind) -> Option<std::fs::File> {
        self.inherited_worker_lock(kind)
            .or_else(|| self.lock_worker(kind))
    }

    /// The lock a worker was started with: the starting command takes the
    /// lock and hands it over as the worker's stdin, so the worker counts as
    /// running from the moment it is spawned (no second one can start, and
    /// no one waits in vain for one still starting up).
    fn inherited_worker_lock(&self, kind: WorkerKind) -> Option<std::fs::File> {
        use std::os::fd::AsFd;
        let stdin = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned().ok()?);
        let ours = std::fs::metadata(self.worker_file(kind, "lock")).ok()?;
        let theirs = stdin.metadata().ok()?;
        (ours.dev() == theirs.dev() && ours.ino() == theirs.ino()).then_some(stdin)
    }

    /// Whether a worker of this kind is alive (holds its lock).
    pub fn worker_running(&self, kind: WorkerKind) -> bool {
        let Ok(file) = std::fs::File::open(self.worker_file(kind, "lock")) else {
            return false;
        };
        matches!(
            file.try_lock_shared(),
            Err(std::fs::TryLockError::WouldBlock)
        )
    }

    /// Where a worker's messages go: it outlives the command that started
    /// it, so it must not write to that command's stderr.
    pub fn worker_log(&self, kind: WorkerKind) -> PathBuf {
        self.worker_file(kind, "log")
    }

    /// Names the worker is working on now, for the repository `binding`.
    /// Only meaningful while [`Spool::worker_running`]: a dead worker's
    /// claims are stale.
    pub fn set_claims(&self, kind: WorkerKind, binding: &RepoBinding, names: &[WalFileName]) {
        let mut text = format!("repository {}\n", binding.0);
        text.extend(names.iter().map(|n| format!("{n}\n")));
        let _ = write_visible(&self.worker_file(kind, "claims"), text.as_bytes());
    }

    /// Whether the worker claims `name`, for any repository.
    pub fn claimed_by_any(&self, kind: WorkerKind, name: &WalFileName) -> bool {
        std::fs::read_to_string(self.worker_file(kind, "claims"))
            .is_ok_and(|text| text.lines().any(|l| l == name.to_string()))
    }

    /// Whether the worker claims `name` for the repository `binding`: a
    /// worker busy with another repository's copy is not worth waiting for.
    pub fn claimed(&self, kind: WorkerKind, binding: &RepoBinding, name: &WalFileName) -> bool {
        std::fs::read_to_string(self.worker_file(kind, "claims")).is_ok_and(|text| {
            let mut lines = text.lines();
            lines.next() == Some(&format!("repository {}", binding.0))
                && lines.any(|l| l == name.to_string())
        })
    }

    fn pushed_dir(&self) -> PathBuf {
        self.dir.join("pushed")
    }

    fn prefetch_dir(&self) -> PathBuf {
        self.dir.join("prefetch")
    }

    /// The repository's segment size, remembered so that a fetch served from
    /// the spool needs no request to know which segments come next.
    pub fn segment_size(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("wal_segment_size"))
            .ok()?
            .trim()
            .parse()
            .ok()
            .filter(|s: &u32| s.is_power_of_two())
    }

    /// Remembers which repository is at `url` (its walvault.json as the
    /// prefetch worker just read it), so that a fetch handing over a copy
    /// need not ask the store again: on a distant store that question costs
    /// a round trip per segment, as much as the download it saves.
    pub fn remember_repository(&self, url: &RepoUrl, config: &RepositoryConfig) {
        let Ok(json) = serde_json::to_vec(config) else {
            return;
        };
        let _ = std::fs::create_dir_all(&self.dir);
        let _ = crate::sys::write_bytes(
            &self.repository_record(url),
            &json,
            Some(0o600),
            crate::sys::Durability::Visible,
        );
    }

    /// The binding of the repository at `url` as a prefetch worker read it
    /// less than [`REPOSITORY_RECORD_AGE`] ago; `None` otherwise (then ask
    /// the store).
    pub fn remembered_binding(&self, url: &RepoUrl) -> Option<RepoBinding> {
        Some(RepoBinding::of(url, &self.remembered_config(url)?))
    }

    /// The walvault.json of the repository at `url` as a prefetch worker
    /// read it less than [`REPOSITORY_RECORD_AGE`] ago.
    pub fn remembered_config(&self, url: &RepoUrl) -> Option<RepositoryConfig> {
        let path = self.repository_record(url);
        let age = std::fs::symlink_metadata(&path)
            .ok()?
            .modified()
            .ok()?
            .elapsed()
            .ok()?;
        if age > REPOSITORY_RECORD_AGE {
            return None;
        }
        let config: RepositoryConfig = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
        config.validate().ok()?;
        Some(config)
    }

    fn repository_record(&self, url: &RepoUrl) -> PathBuf {
        let place = Sha256Digest::of(RepoBinding::place(url).as_bytes()).to_hex();
        self.dir.join(format!("repository-{}.json", &place[..32]))
    }

    pub fn remember_segment_size(&self, size: u32) {
        let _ = std::fs::create_dir_all(&self.dir);
        let _ = crate::sys::write_file_atomically(
            &self.dir.join("wal_segment_size"),
            size.to_string().as_bytes(),
            Some(0o600),
        );
    }

    /// Records that `name`, as the file `identity` describes, is durably
    /// stored in the repository `binding`.
    pub fn record_pushed(
        &self,
        binding: &RepoBinding,
        name: &WalFileName,
        identity: &FileIdentity,
    ) -> Result<()> {
        let dir = self.pushed_dir();
        std::fs::create_dir_all(&dir).context(|| format!("cannot create {}", dir.display()))?;
        let json = serde_json::to_vec(identity).expect("serializes");
        // Not synced: the segment is already durable, so a record lost or torn
        // by a crash (it then fails to parse) only costs a second, identical push.
        write_visible(&self.record_path(binding, name), &json)
    }

    /// `pushed/NAME.BINDING.json`.
    fn record_path(&self, binding: &RepoBinding, name: &WalFileName) -> PathBuf {
        self.pushed_dir().join(format!("{name}.{}.json", binding.0))
    }

    /// The record that `name` is stored in the repository `binding`, if any.
    pub fn pushed(&self, binding: &RepoBinding, name: &WalFileName) -> Option<FileIdentity> {
        let bytes = std::fs::read(self.record_path(binding, name)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn forget_pushed(&self, binding: &RepoBinding, name: &WalFileName) {
        let _ = std::fs::remove_file(self.record_path(binding, name));
    }

    /// Drops records whose segment is no longer in `wal_dir` (archived and
    /// recycled): they can never be asked for again. Records of versions
    /// that did not name their repository (`NAME.json`) prove nothing, and
    /// go too.
    pub fn prune_pushed(&self, wal_dir: &Path) {
        let Ok(entries) = std::fs::read_dir(self.pushed_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().to_string();
            let live = file
                .strip_suffix(".json")
                .and_then(|stem| stem.split_once('.'))
                .is_some_and(|(name, binding)| {
                    RepoBinding::is_key(binding) && wal_dir.join(name).exists()
                });
            if !live {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Every prefetched copy, of any repository, as
    /// `(name, expected sha256, binding key, path)`: `NAME.SHA256.BINDING`.
    fn copies(&self) -> Vec<(WalFileName, Sha256Digest, String, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(self.prefetch_dir()) else {
            return vec![];
        };
        entries
            .flatten()
            .filter_map(|e| {
                let file = e.file_name().to_string_lossy().to_string();
                let (name, rest) = file.split_once('.')?;
                let (sha, binding) = rest.split_once('.')?;
                RepoBinding::is_key(binding).then_some(())?;
                Some((
                    WalFileName::parse(name).ok()?,
                    Sha256Digest::from_hex(sha)?,
                    binding.to_string(),
                    e.path(),
                ))
            })
            .collect()
    }

    /// Whether a copy of `name` is spooled, from any repository.
    pub fn prefetched_by_any(&self, name: &WalFileName) -> bool {
        self.copies().iter().any(|(n, ..)| n == name)
    }

    /// Segments prefetched from the repository `binding`, as
    /// `(name, expected sha256, path)`.
    pub fn prefetched(&self, binding: &RepoBinding) -> Vec<(WalFileName, Sha256Digest, PathBuf)> {
        self.copies()
            .into_iter()
            .filter(|(_, _, b, _)| *b == binding.0)
            .map(|(name, sha, _, path)| (name, sha, path))
            .collect()
    }

    /// Removes every prefetched copy, of any repository, that `keep` does
    /// not want, including leftovers of interrupted downloads, except while
    /// a prefetch worker runs: its downloads in progress are not leftovers.
    /// Copies of versions that did not name their repository go too.
    pub fn discard_prefetched(&self, keep: impl Fn(&WalFileName) -> bool) {
        let Ok(entries) = std::fs::read_dir(self.prefetch_dir()) else {
            return;
        };
        let downloading = self.worker_running(WorkerKind::Prefetch);
        let wanted: Vec<PathBuf> = self
            .copies()
            .into_iter()
            .filter(|(name, ..)| keep(name))
            .map(|(.., path)| path)
            .collect();
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().to_string();
            if downloading && file.starts_with('.') {
                continue;
            }
            if !wanted.contains(&e.path()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Stores a verified segment of the repository `binding` for a later
    /// fetch. `fill` writes the content and must prove it has `sha256`; only
    /// then is the copy renamed into place.
    pub fn store_prefetched(
        &self,
        binding: &RepoBinding,
        name: &WalFileName,
        sha256: &Sha256Digest,
        fill: impl FnOnce(&mut std::fs::File) -> Result<()>,
    ) -> Result<()> {
        let dir = self.prefetch_dir();
        std::fs::create_dir_all(&dir).context(|| format!("cannot create {}", dir.display()))?;
        // Not synced: a copy torn by a crash fails the sha256 check at hand-over.
        crate::sys::write_atomically_with(
            &dir.join(format!("{name}.{}.{}", sha256.to_hex(), binding.0)),
            Some(0o600),
            crate::sys::Durability::Visible,
            fill,
        )
    }
}

/// Spool files need no fsync: each is checked before it counts (see the
/// module comment), so a crash can only cost work done ahead.
fn write_visible(path: &Path, data: &[u8]) -> Result<()> {
    crate::sys::write_bytes(path, data, Some(0o600), crate::sys::Durability::Visible)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, SystemTime};

    #[test]
    fn a_remembered_repository_speaks_for_its_url_only_and_not_for_long() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::at(dir.path());
        let config = RepositoryConfig {
            format: 1,
            system_identifier: "7000000000000000123".into(),
            pg_version: 15,
            wal_segment_size: 1 << 24,
            created_at: chrono::Utc::now(),
            upgrades: Vec::new(),
        };
        let here = RepoUrl::parse("/srv/a").unwrap();
        let there = RepoUrl::parse("/srv/b").unwrap();
        assert_eq!(spool.remembered_binding(&here), None);
        spool.remember_repository(&here, &config);
        assert_eq!(
            spool.remembered_binding(&here),
            Some(RepoBinding::of(&here, &config))
        );
        assert_eq!(spool.remembered_binding(&there), None);
        // Too old a reading is not taken: the store is asked again.
        let record = spool.repository_record(&here);
        let old = SystemTime::now() - REPOSITORY_RECORD_AGE - Duration::from_secs(1);
        std::fs::File::options()
            .write(true)
            .open(&record)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(spool.remembered_binding(&here), None);
    }

    #[test]
    fn a_binding_names_one_repository() {
        let config = |sysid: &str, created: &str| RepositoryConfig {
            format: 1,
            system_identifier: sysid.into(),
            pg_version: 15,
            wal_segment_size: 1 << 24,
            created_at: created.parse().unwrap(),
            upgrades: Vec::new(),
        };
        let url = |u: &str| RepoUrl::parse(u).unwrap();
        let first = config("7", "2026-12-01T10:00:00.123456789Z");
        let ours = RepoBinding::of(&url("/srv/wal"), &first);
        // One repository, spelled several ways.
        for same in ["/srv/wal/", "file:///srv/wal", "/srv//wal", "/srv/./wal"] {
            assert_eq!(RepoBinding::of(&url(same), &first), ours, "{same}");
        }
        // Another place, another cluster, or one recreated in the same place.
        assert_ne!(RepoBinding::of(&url("/srv/wal2"), &first), ours);
        assert_ne!(RepoBinding::of(&url("s3://srv-bucket/wal"), &first), ours);
        let other_cluster = config("8", "2026-12-01T10:00:00.123456789Z");
        assert_ne!(RepoBinding::of(&url("/srv/wal"), &other_cluster), ours);
        let recreated = config("7", "2026-12-01T10:00:00.123456788Z");
        assert_ne!(RepoBinding::of(&url("/srv/wal"), &recreated), ours);
        assert!(RepoBinding::is_key(&ours.0));
    }

    #[test]
    fn metadata_proves_a_file_unchanged_only_once_settled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("000000010000000000000001");
        std::fs::write(&path, b"segment").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let sha = Sha256Digest::of(b"segment");
        let ctime =
            std::time::UNIX_EPOCH + Duration::new(meta.ctime() as u64, meta.ctime_nsec() as u32);

        assert!(
            local_timestamps(&path),
            "the test's temp dir is on a local filesystem"
        );
        // Read right after its last write: the timestamps prove nothing.
        let racy = FileIdentity::of(&meta, &sha, SystemTime::now());
        assert!(!racy.unchanged_by_metadata(&meta, SystemTime::now()));
        assert!(racy.matches(&meta, &sha));

        // Read well after its last write (as a backlog is).
        let read_from = ctime + Duration::from_secs(3);
        let settled = FileIdentity::of(&meta, &sha, read_from);
        assert!(settled.unchanged_by_metadata(&meta, read_from + Duration::from_secs(1)));
        // A clock set back since then voids the proof.
        assert!(!settled.unchanged_by_metadata(&meta, read_from - Duration::from_secs(1)));
        // Records of older versions carry no read time.
        let mut old = serde_json::to_value(&settled).unwrap();
        old.as_object_mut().unwrap().remove("read_from_ns");
        let old: FileIdentity = serde_json::from_value(old).unwrap();
        assert!(!old.unchanged_by_metadata(&meta, read_from + Duration::from_secs(1)));
        assert!(old.matches(&meta, &sha));

        // Any write afterwards gives the file a newer ctime.
        std::thread::sleep(Duration::from_millis(50));
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"!").unwrap();
        drop(f);
        let changed = std::fs::metadata(&path).unwrap();
        assert!(!settled.unchanged_by_metadata(&changed, read_from + Duration::from_secs(1)));
        assert!(!settled.matches(&changed, &sha));
    }
}
