//! The repository: named objects in a [`Store`] (a filesystem, S3, or
//! memory), bound to one cluster by its config.

pub mod archive;
pub mod catalog;
pub mod lock;
pub mod retention;

pub use crate::store::{Created, LEFTOVER_AGE, Leftover, ObjectInfo, ObjectReader, RepoUrl};

use crate::error::{Error, ErrorKind, Result};
use crate::format::key::{CONFIG_KEY, Key};
use crate::store::{Payload, Staging, Store};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The file at the repository's root that says what it is and whose it is.
pub const REPOSITORY_FORMAT: u32 = 1;

/// The cluster a repository belongs to: fixed by the first segment pushed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryConfig {
    pub format: u32,
    /// As a string: JSON numbers lose precision past 2^53.
    pub system_identifier: String,
    pub pg_version: u32,
    pub wal_segment_size: u32,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl RepositoryConfig {
    /// Refuses a config no walvault writes: every reader divides by the
    /// segment size and compares identifiers, so a hand-edited or damaged
    /// field must stop here with a clear error, not panic later.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.format == 0 {
            return Err("format 0 does not exist (formats start at 1)".into());
        }
        let sysid_ok = !self.system_identifier.is_empty()
            && self.system_identifier.bytes().all(|b| b.is_ascii_digit())
            && self
                .system_identifier
                .parse::<u64>()
                .is_ok_and(|id| id != 0);
        if !sysid_ok {
            return Err(format!(
                "system_identifier '{}' is not a cluster's system identifier (a non-zero decimal 64-bit number)",
                self.system_identifier.escape_debug()
            ));
        }
        if !(9..=999).contains(&self.pg_version) {
            return Err(format!(
                "pg_version {} is not a PostgreSQL major version",
                self.pg_version
            ));
        }
        let size = self.wal_segment_size;
        if !size.is_power_of_two() || !(1 << 20..=1 << 30).contains(&size) {
            return Err(format!(
                "wal_segment_size {size} is not a power of two between 1 MiB and 1 GiB"
            ));
        }
        Ok(())
    }

    /// Refuses WAL of another cluster (or another segment size): two
    /// clusters' WAL must never mix in one archive.
    pub fn check_same_cluster(&self, cluster: &RepositoryConfig, url: &RepoUrl) -> Result<()> {
        let existing = self;
        if existing.system_identifier != cluster.system_identifier {
            return Err(Error::conflict(format!(
                "repository {} belongs to cluster {} but this WAL comes from cluster {}; \
                 two clusters must not share a repository: give this one its own --repo",
                url, existing.system_identifier, cluster.system_identifier
            )));
        }
        if existing.wal_segment_size != cluster.wal_segment_size {
            return Err(Error::conflict(format!(
                "repository {} holds {}-byte WAL segments, this one is {} bytes",
                url, existing.wal_segment_size, cluster.wal_segment_size
            )));
        }
        Ok(())
    }
}

/// Makes what this process creates owner-only (files 0600, directories
/// 0700), or readable by the group too (0640, 0750) where the local
/// repository's directory grants its group access: a repository holds the
/// whole database, so its modes must not depend on the umask of whatever cron
/// job or shell runs walvault. Process-wide, so call it before any thread
/// starts, and only for commands that write no PostgreSQL data directory or
/// pg_wal (PostgreSQL dictates those modes). Nothing to do for S3.
pub fn restrict_created_modes(url: &RepoUrl) {
    let RepoUrl::Local(root) = url else {
        return;
    };
    let mask = if crate::store::local::grants_group(root) {
        0o027
    } else {
        0o077
    };
    crate::sys::set_umask(mask);
}

pub struct Repository {
    store: Arc<dyn Store>,
    url: RepoUrl,
}

impl Repository {
    /// Opens the repository at `url`. A missing local directory is created
    /// only when `create` is set (push), so a typo'd path on read is an error,
    /// not an empty archive.
    pub fn open(url: &RepoUrl, create: bool) -> Result<Repository> {
        Ok(Repository::with_store(
            crate::store::open(url, create)?,
            url.clone(),
        ))
    }

    /// The repository `url` names, kept by `store`.
    pub fn with_store(store: Arc<dyn Store>, url: RepoUrl) -> Repository {
        Repository { store, url }
    }

    /// An empty repository in memory, for tests.
    #[cfg(test)]
    pub fn in_memory() -> Repository {
        let url = RepoUrl::S3 {
            bucket: "in-memory".into(),
            prefix: String::new(),
        };
        let store = crate::store::memory::MemoryStore::named(&url);
        Repository::with_store(Arc::new(store), url)
    }

    pub fn url(&self) -> &RepoUrl {
        &self.url
    }

    /// Reads a whole object; `None` when there is none.
    pub async fn get(&self, key: &Key) -> Result<Option<Bytes>> {
        self.store.get(key).await
    }

    /// Opens an object for reading as it arrives; `None` when there is none.
    pub async fn open_object(&self, key: &Key) -> Result<Option<ObjectReader>> {
        self.store.read(key).await
    }

    /// Reads `range` of an object; a missing object is an error here, since
    /// only manifests point into objects by range.
    pub async fn get_range(&self, key: &Key, range: std::ops::Range<u64>) -> Result<Bytes> {
        self.store.get_range(key, range).await
    }

    /// Writes `data` under `key` unless something is already there; returns
    /// only once the object is durable. Refused on a store that would
    /// overwrite instead.
    pub async fn put_new(&self, key: &Key, data: impl Into<Payload>) -> Result<Created> {
        self.store.put_new(key, data.into()).await
    }

    /// Where to make the object for `key` while it is written (see
    /// [`Store::stage`]).
    pub fn stage(&self, key: &Key) -> Staging {
        self.store.stage(key)
    }

    /// Writes an object made in `staging` (or in memory, as `parts`) like
    /// `put_new`; when the name is taken, our object comes back.
    pub async fn put_staged(
        &self,
        key: &Key,
        staging: Staging,
        parts: impl Into<Payload>,
    ) -> Result<Option<Payload>> {
        self.store.put_staged(key, staging, parts.into()).await
    }

    /// Makes an object found already stored durable.
    pub async fn make_durable(&self, key: &Key) -> Result<()> {
        self.store.make_durable(key).await
    }

    /// Replaces an object; only for repairing one that fails its own checks.
    pub async fn put_replace(&self, key: &Key, data: impl Into<Payload>) -> Result<()> {
        self.store.put_replace(key, data.into()).await
    }

    pub async fn delete(&self, key: &Key) -> Result<()> {
        self.store.delete(key).await
    }

    /// Every object under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.store.list(prefix).await
    }

    /// What writes killed mid-way left behind (see [`Store::leftovers`]).
    pub async fn leftovers(&self) -> Result<Vec<Leftover>> {
        self.store.leftovers().await
    }

    /// Deletes a leftover; one already gone is fine.
    pub fn delete_leftover(&self, leftover: &Leftover) -> Result<()> {
        self.store.delete_leftover(leftover)
    }

    pub async fn config(&self) -> Result<Option<RepositoryConfig>> {
        let Some(bytes) = self.get(&Key::from(CONFIG_KEY)).await? else {
            return Ok(None);
        };
        let config: RepositoryConfig = serde_json::from_slice(&bytes).map_err(|e| {
            Error::corrupt(format!("{CONFIG_KEY} in {} is unreadable: {e}", self.url))
        })?;
        if config.format > REPOSITORY_FORMAT {
            return Err(Error::usage(format!(
                "repository {} has format {}, this walvault reads up to {REPOSITORY_FORMAT}; upgrade walvault",
                self.url, config.format
            )));
        }
        config.validate().map_err(|why| {
            Error::corrupt(format!(
                "{CONFIG_KEY} in {} is damaged: {why}; restore it from a copy \
                 (every archived segment's header records the system identifier and segment size)",
                self.url
            ))
        })?;
        Ok(Some(config))
    }

    /// The repository's config, or a clear error when `url` holds no repository.
    pub async fn require_config(&self) -> Result<RepositoryConfig> {
        self.config().await?.ok_or_else(|| {
            Error::new(
                ErrorKind::Usage,
                format!(
                    "no walvault repository at {} ({CONFIG_KEY} is missing); check --repo / WALVAULT_REPO",
                    self.url
                ),
            )
        })
    }

    /// Binds the repository to `cluster` on first use, and afterwards refuses
    /// any other cluster: two clusters' WAL must never mix in one archive.
    pub async fn bind_cluster(&self, cluster: &RepositoryConfig) -> Result<RepositoryConfig> {
        let existing = match self.config().await? {
            Some(c) => c,
            None => {
                let json = serde_json::to_vec_pretty(cluster).expect("config serializes");
                match self
                    .put_new(&Key::from(CONFIG_KEY), Bytes::from(json))
                    .await?
                {
                    Created::New => {
                        tracing::info!(
                            "initialized repository {} for cluster {} (PostgreSQL {}, {} MiB segments)",
                            self.url,
                            cluster.system_identifier,
                            cluster.pg_version,
                            cluster.wal_segment_size >> 20
                        );
                        return Ok(cluster.clone());
                    }
                    // Another push created it first: compare with theirs.
                    Created::AlreadyExists => self.require_config().await?,
                }
            }
        };
        existing.check_same_cluster(cluster, &self.url)?;
        Ok(existing)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_validation_refuses_nonsense() {
        let good = super::RepositoryConfig {
            format: 1,
            system_identifier: "7712875144486048961".into(),
            pg_version: 15,
            wal_segment_size: 16 << 20,
            created_at: chrono::Utc::now(),
        };
        assert_eq!(good.validate(), Ok(()));
        type Spoil = fn(&mut super::RepositoryConfig);
        let bad: [(&str, Spoil); 9] = [
            ("format", |c| c.format = 0),
            ("system_identifier", |c| c.system_identifier = "".into()),
            ("system_identifier", |c| c.system_identifier = "0".into()),
            ("system_identifier", |c| c.system_identifier = "-5".into()),
            ("system_identifier", |c| {
                c.system_identifier = "99999999999999999999".into()
            }),
            ("pg_version", |c| c.pg_version = 0),
            ("wal_segment_size", |c| c.wal_segment_size = 0),
            ("wal_segment_size", |c| c.wal_segment_size = 3 << 20),
            ("wal_segment_size", |c| c.wal_segment_size = 1 << 31),
        ];
        for (field, spoil) in bad {
            let mut c = good.clone();
            spoil(&mut c);
            let why = c.validate().expect_err(field);
            assert!(why.contains(field), "{why}");
        }
    }

    #[tokio::test]
    async fn an_in_memory_repository_binds_one_cluster() {
        let repo = super::Repository::in_memory();
        assert_eq!(repo.config().await.unwrap(), None);
        assert!(repo.require_config().await.is_err());
        let cluster = super::RepositoryConfig {
            format: 1,
            system_identifier: "7712875144486048961".into(),
            pg_version: 15,
            wal_segment_size: 16 << 20,
            created_at: chrono::Utc::now(),
        };
        assert_eq!(repo.bind_cluster(&cluster).await.unwrap(), cluster);
        assert_eq!(repo.require_config().await.unwrap(), cluster);
        let other = super::RepositoryConfig {
            system_identifier: "42".into(),
            ..cluster.clone()
        };
        let e = repo.bind_cluster(&other).await.unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::Conflict);
        let listed = repo.list("").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].key.as_str(), crate::format::key::CONFIG_KEY);
    }
}
