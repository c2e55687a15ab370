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

/// The newest repository format this walvault reads (docs/format.md):
/// 1 holds one cluster; 2 holds clusters bound later by `walvault upgrade`,
/// each in a folder of its own.
pub const REPOSITORY_FORMAT: u32 = 2;
/// The format push and backup create a repository in: a repository of one
/// cluster stays readable by every walvault that reads format 1.
pub const ONE_CLUSTER_FORMAT: u32 = 1;
pub use crate::format::key::CLUSTERS_DIR;

/// The cluster a repository belongs to: fixed by the first segment pushed,
/// and changed only by `walvault upgrade`, which adds a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryConfig {
    pub format: u32,
    /// As a string: JSON numbers lose precision past 2^53.
    pub system_identifier: String,
    pub pg_version: u32,
    pub wal_segment_size: u32,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Clusters bound after the first, oldest first; the last is the one
    /// archiving now (format 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upgrades: Vec<ClusterRecord>,
}

/// A cluster bound by `walvault upgrade`, whose objects live in the folder
/// `namespace`, laid out like a repository of one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub namespace: String,
    pub system_identifier: String,
    pub pg_version: u32,
    pub wal_segment_size: u32,
    pub bound_at: chrono::DateTime<chrono::Utc>,
}

impl ClusterRecord {
    /// The folder of the cluster with `system_identifier` on `pg_version`.
    pub fn namespace_for(pg_version: u32, system_identifier: &str) -> String {
        format!("{CLUSTERS_DIR}/{pg_version}-{system_identifier}")
    }

    /// The config of a repository of this cluster alone: what its folder's
    /// walvault.json holds.
    pub fn own_config(&self) -> RepositoryConfig {
        RepositoryConfig {
            format: ONE_CLUSTER_FORMAT,
            system_identifier: self.system_identifier.clone(),
            pg_version: self.pg_version,
            wal_segment_size: self.wal_segment_size,
            created_at: self.bound_at,
            upgrades: Vec::new(),
        }
    }
}

/// One cluster of a repository, and the repository as that cluster sees it.
pub struct Cluster {
    pub repo: Repository,
    /// The cluster's own config (format 1, no upgrades).
    pub config: RepositoryConfig,
    /// The folder its objects are in; `None` for the first cluster, whose
    /// objects are at the repository's root.
    pub namespace: Option<String>,
    /// The cluster archiving now (the last one bound).
    pub current: bool,
}

/// The checks every cluster's fields pass (see [`RepositoryConfig::validate`]).
fn validate_cluster(
    system_identifier: &str,
    pg_version: u32,
    wal_segment_size: u32,
) -> std::result::Result<(), String> {
    let sysid_ok = !system_identifier.is_empty()
        && system_identifier.bytes().all(|b| b.is_ascii_digit())
        && system_identifier.parse::<u64>().is_ok_and(|id| id != 0);
    if !sysid_ok {
        return Err(format!(
            "system_identifier '{}' is not a cluster's system identifier (a non-zero decimal 64-bit number)",
            system_identifier.escape_debug()
        ));
    }
    if !(9..=999).contains(&pg_version) {
        return Err(format!(
            "pg_version {pg_version} is not a PostgreSQL major version"
        ));
    }
    let size = wal_segment_size;
    if !size.is_power_of_two() || !(1 << 20..=1 << 30).contains(&size) {
        return Err(format!(
            "wal_segment_size {size} is not a power of two between 1 MiB and 1 GiB"
        ));
    }
    Ok(())
}

impl RepositoryConfig {
    /// Refuses a config no walvault writes: every reader divides by the
    /// segment size and compares identifiers, and a namespace becomes part
    /// of every key, so a hand-edited or damaged field must stop here with
    /// a clear error, not panic or reach outside the repository later.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.format == 0 {
            return Err("format 0 does not exist (formats start at 1)".into());
        }
        validate_cluster(
            &self.system_identifier,
            self.pg_version,
            self.wal_segment_size,
        )?;
        if self.format == ONE_CLUSTER_FORMAT && !self.upgrades.is_empty() {
            return Err("format 1 holds one cluster, but upgrades are listed".into());
        }
        if self.format >= 2 && self.upgrades.is_empty() {
            return Err(format!(
                "format {} lists the clusters bound by upgrades, but none is listed",
                self.format
            ));
        }
        let mut seen = vec![self.system_identifier.as_str()];
        for u in &self.upgrades {
            validate_cluster(&u.system_identifier, u.pg_version, u.wal_segment_size)
                .map_err(|e| format!("upgrade to cluster {}: {e}", u.system_identifier))?;
            if u.namespace != ClusterRecord::namespace_for(u.pg_version, &u.system_identifier) {
                return Err(format!(
                    "cluster {}'s namespace '{}' is not {}",
                    u.system_identifier,
                    u.namespace.escape_debug(),
                    ClusterRecord::namespace_for(u.pg_version, &u.system_identifier)
                ));
            }
            if seen.contains(&u.system_identifier.as_str()) {
                return Err(format!("cluster {} is listed twice", u.system_identifier));
            }
            seen.push(&u.system_identifier);
        }
        Ok(())
    }

    /// The config of the cluster archiving now, as a repository of that
    /// cluster alone would have it.
    pub fn current_cluster(&self) -> RepositoryConfig {
        match self.upgrades.last() {
            Some(u) => u.own_config(),
            None => RepositoryConfig {
                upgrades: Vec::new(),
                ..self.clone()
            },
        }
    }

    /// The folder of the cluster archiving now (`None`: the root).
    pub fn current_namespace(&self) -> Option<&str> {
        self.upgrades.last().map(|u| u.namespace.as_str())
    }

    /// The namespace of `system_identifier`'s cluster, if it is one of
    /// this repository's (`Some(None)`: the first cluster, at the root).
    pub fn namespace_of(&self, system_identifier: &str) -> Option<Option<&str>> {
        if self.system_identifier == system_identifier {
            return Some(None);
        }
        self.upgrades
            .iter()
            .find(|u| u.system_identifier == system_identifier)
            .map(|u| Some(u.namespace.as_str()))
    }

    /// Refuses WAL of another cluster (or another segment size) than the
    /// one archiving now: two clusters' WAL must never mix in one archive.
    pub fn check_same_cluster(&self, cluster: &RepositoryConfig, url: &RepoUrl) -> Result<()> {
        let existing = &self.current_cluster();
        if existing.system_identifier != cluster.system_identifier
            && self.namespace_of(&cluster.system_identifier).is_some()
        {
            return Err(Error::conflict(format!(
                "repository {url} now archives cluster {} (PostgreSQL {}), bound by walvault upgrade; \
                 cluster {} archives there no more: turn its archive_mode off, or give it its own --repo",
                existing.system_identifier, existing.pg_version, cluster.system_identifier
            )));
        }
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
    /// The repository as the cluster in `namespace` sees it (the root for
    /// `None`): the same store, every key inside that folder.
    pub fn view(&self, namespace: Option<&str>) -> Repository {
        let store: Arc<dyn Store> = match namespace {
            None => self.store.clone(),
            Some(ns) => Arc::new(crate::store::prefixed::PrefixedStore::new(
                self.store.clone(),
                ns,
            )),
        };
        Repository {
            store,
            url: self.url.clone(),
        }
    }

    /// Every cluster of a repository whose root config is `root`, first
    /// bound first.
    pub fn clusters(&self, root: &RepositoryConfig) -> Vec<Cluster> {
        let last = root.upgrades.len();
        let mut all = vec![Cluster {
            repo: self.view(None),
            config: RepositoryConfig {
                format: ONE_CLUSTER_FORMAT,
                upgrades: Vec::new(),
                ..root.clone()
            },
            namespace: None,
            current: last == 0,
        }];
        for (i, u) in root.upgrades.iter().enumerate() {
            all.push(Cluster {
                repo: self.view(Some(&u.namespace)),
                config: u.own_config(),
                namespace: Some(u.namespace.clone()),
                current: i + 1 == last,
            });
        }
        all
    }

    /// The own configs of every cluster of a repository whose root config
    /// is `root`, first bound first.
    pub fn clusters_of(root: &RepositoryConfig) -> Vec<RepositoryConfig> {
        std::iter::once(RepositoryConfig {
            format: ONE_CLUSTER_FORMAT,
            upgrades: Vec::new(),
            ..root.clone()
        })
        .chain(root.upgrades.iter().map(ClusterRecord::own_config))
        .collect()
    }

    /// The cluster archiving now.
    pub fn current(&self, root: &RepositoryConfig) -> Cluster {
        self.clusters(root)
            .into_iter()
            .find(|c| c.current)
            .expect("one cluster is current")
    }

    /// The cluster `system_identifier` names, if the repository has it.
    pub fn cluster(&self, root: &RepositoryConfig, system_identifier: &str) -> Result<Cluster> {
        self.clusters(root)
            .into_iter()
            .find(|c| c.config.system_identifier == system_identifier)
            .ok_or_else(|| {
                Error::usage(format!(
                    "repository {} holds no cluster {system_identifier}; 'walvault list' shows its clusters' backups",
                    self.url
                ))
            })
    }
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
            upgrades: Vec::new(),
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
            upgrades: Vec::new(),
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

    fn upgraded() -> super::RepositoryConfig {
        let first = super::RepositoryConfig {
            format: 2,
            system_identifier: "7712875144486048961".into(),
            pg_version: 15,
            wal_segment_size: 16 << 20,
            created_at: chrono::Utc::now(),
            upgrades: Vec::new(),
        };
        super::RepositoryConfig {
            upgrades: vec![super::ClusterRecord {
                namespace: super::ClusterRecord::namespace_for(16, "42"),
                system_identifier: "42".into(),
                pg_version: 16,
                wal_segment_size: 1 << 20,
                bound_at: chrono::Utc::now(),
            }],
            ..first
        }
    }

    /// A namespace becomes part of every key of its cluster: one that is not
    /// exactly what its fields say, or a cluster listed twice, is refused.
    #[test]
    fn upgrades_are_validated() {
        assert_eq!(upgraded().validate(), Ok(()));
        type Spoil = fn(&mut super::RepositoryConfig);
        let bad: [(&str, Spoil); 6] = [
            ("namespace", |c| {
                c.upgrades[0].namespace = "clusters/../../etc".into()
            }),
            ("namespace", |c| {
                c.upgrades[0].namespace = "clusters/16-43".into()
            }),
            ("listed twice", |c| {
                c.upgrades[0].system_identifier = c.system_identifier.clone();
                c.upgrades[0].namespace =
                    super::ClusterRecord::namespace_for(16, &c.system_identifier);
            }),
            ("upgrades are listed", |c| c.format = 1),
            ("none is listed", |c| c.upgrades.clear()),
            ("wal_segment_size", |c| c.upgrades[0].wal_segment_size = 5),
        ];
        for (what, spoil) in bad {
            let mut c = upgraded();
            spoil(&mut c);
            let why = c.validate().expect_err(what);
            assert!(why.contains(what), "{why}");
        }
    }

    /// After an upgrade, the new cluster archives in its folder and the old
    /// one is refused by name; each cluster sees only its own objects.
    #[tokio::test]
    async fn an_upgraded_repository_keeps_each_cluster_apart() {
        let repo = super::Repository::in_memory();
        let root = upgraded();
        let clusters = repo.clusters(&root);
        assert_eq!(clusters.len(), 2);
        assert!(!clusters[0].current && clusters[1].current);
        assert_eq!(clusters[1].namespace.as_deref(), Some("clusters/16-42"));
        let key = crate::format::key::Key::from("wal/x.zst");
        clusters[0].repo.put_new(&key, &b"old"[..]).await.unwrap();
        clusters[1].repo.put_new(&key, &b"new"[..]).await.unwrap();
        assert_eq!(
            &clusters[0].repo.get(&key).await.unwrap().unwrap()[..],
            b"old"
        );
        assert_eq!(
            &clusters[1].repo.get(&key).await.unwrap().unwrap()[..],
            b"new"
        );
        assert_eq!(repo.current(&root).config.system_identifier, "42");
        assert!(repo.cluster(&root, "7").is_err());

        let url = repo.url().clone();
        let first_cluster = super::RepositoryConfig {
            format: 1,
            upgrades: Vec::new(),
            ..root.clone()
        };
        let e = root.check_same_cluster(&first_cluster, &url).unwrap_err();
        assert!(e.to_string().contains("archives there no more"), "{e}");
        assert!(
            root.check_same_cluster(&root.current_cluster(), &url)
                .is_ok()
        );
        let stranger = super::RepositoryConfig {
            system_identifier: "99".into(),
            ..root.current_cluster()
        };
        let e = root.check_same_cluster(&stranger, &url).unwrap_err();
        assert!(e.to_string().contains("must not share a repository"), "{e}");
    }
}
