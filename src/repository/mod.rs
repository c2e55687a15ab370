//! The repository: named objects over object_store, on a filesystem or S3.
//!
//! Every write is a create that never replaces what is there (a hard link on
//! the filesystem, `If-None-Match: *` on S3, proven honoured by the store
//! before it is relied on), so two writers can never silently overwrite each
//! other; the filesystem store fsyncs the file and its directory before a
//! write is reported done.

pub mod archive;
pub mod catalog;
pub mod lock;
mod probe;
pub mod retention;
mod staged;
mod url;

pub use staged::{LEFTOVER_AGE, Leftover, StagedObject};
pub use url::RepoUrl;

use crate::error::{Error, ErrorKind, Result};
use crate::format::key::CONFIG_KEY;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::prefix::PrefixStore;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
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
    let mask = if grants_group(root) { 0o027 } else { 0o077 };
    crate::sys::set_umask(mask);
}

/// Whether the operator gave the repository's directory to a group: group
/// access and none for others. A plain `mkdir` under umask 022 (0755) grants
/// its group nothing on purpose, so it must not make the database readable
/// by whatever group the directory happens to have.
fn grants_group(root: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(root).is_ok_and(|m| {
        let mode = m.permissions().mode();
        mode & 0o070 != 0 && mode & 0o007 == 0
    })
}

/// What a create-only write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New,
    AlreadyExists,
}

pub struct Repository {
    store: Arc<dyn ObjectStore>,
    url: RepoUrl,
    /// The store create-only writes must be proven on (see `probe`);
    /// `None` on a filesystem, where the kernel refuses them itself.
    store_name: Option<String>,
    create_only: tokio::sync::OnceCell<()>,
}

/// An object being read: a local file (read in large pieces, in place),
/// or the body of a response from the store.
pub enum ObjectReader {
    File {
        file: std::fs::File,
        size: u64,
    },
    Stream {
        stream: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
        size: u64,
    },
}

impl Repository {
    /// Opens the repository at `url`. A missing local directory is created
    /// only when `create` is set (push), so a typo'd path on read is an error,
    /// not an empty archive.
    pub fn open(url: &RepoUrl, create: bool) -> Result<Repository> {
        let mut store_name = None;
        let store: Arc<dyn ObjectStore> = match url {
            RepoUrl::Local(root) => {
                if create {
                    use std::os::unix::fs::DirBuilderExt;
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(root)
                        .map_err(|e| {
                            Error::io(format!(
                                "cannot create repository directory {}: {e}",
                                root.display()
                            ))
                        })?;
                } else if !root.is_dir() {
                    return Err(Error::usage(format!(
                        "repository directory {} does not exist; check --repo / WALVAULT_REPO",
                        root.display()
                    )));
                }
                let fs = LocalFileSystem::new_with_prefix(root)
                    .map_err(|e| {
                        Error::io(format!("cannot open repository {}: {e}", root.display()))
                    })?
                    .with_fsync(true)
                    .with_automatic_cleanup(false);
                Arc::new(fs)
            }
            RepoUrl::S3 { bucket, prefix } => {
                let builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
                let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
                store_name = Some(probe::s3_store_name(endpoint.as_deref()));
                let s3 = builder
                    .build()
                    .map_err(|e| Error::usage(format!("cannot configure S3 for {url}: {e}")))?;
                if prefix.is_empty() {
                    Arc::new(s3)
                } else {
                    Arc::new(PrefixStore::new(s3, prefix.as_str()))
                }
            }
        };
        Ok(Repository::with_store(store, url.clone(), store_name))
    }

    fn with_store(
        store: Arc<dyn ObjectStore>,
        url: RepoUrl,
        store_name: Option<String>,
    ) -> Repository {
        Repository {
            store,
            url,
            store_name,
            create_only: tokio::sync::OnceCell::new(),
        }
    }

    pub fn url(&self) -> &RepoUrl {
        &self.url
    }

    fn local_root(&self) -> Option<&std::path::Path> {
        match &self.url {
            RepoUrl::Local(root) => Some(root),
            RepoUrl::S3 { .. } => None,
        }
    }

    fn storage_error(&self, action: &str, key: &Key, e: object_store::Error) -> Error {
        Error::io(format!(
            "{action} {key} in {}: {}",
            self.url,
            redact(&e.to_string())
        ))
    }

    /// Reads a whole object; `None` when there is none.
    pub async fn get(&self, key: &Key) -> Result<Option<Bytes>> {
        let result = match self.store.get(key).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.storage_error("cannot read", key, e)),
        };
        match result.bytes().await {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.storage_error("cannot read", key, e)),
        }
    }

    /// Opens an object for reading as it arrives; `None` when there is none.
    pub async fn open_object(&self, key: &Key) -> Result<Option<ObjectReader>> {
        match self.store.get(key).await {
            Ok(r) => {
                let size = r.meta.size;
                Ok(Some(match r.payload {
                    object_store::GetResultPayload::File(file, _) => {
                        ObjectReader::File { file, size }
                    }
                    object_store::GetResultPayload::Stream(stream) => {
                        ObjectReader::Stream { stream, size }
                    }
                }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.storage_error("cannot read", key, e)),
        }
    }

    /// Reads `range` of an object; a missing object is an error here, since
    /// only manifests point into objects by range.
    pub async fn get_range(&self, key: &Key, range: std::ops::Range<u64>) -> Result<Bytes> {
        match self.store.get_range(key, range.clone()).await {
            Ok(b) if b.len() as u64 == range.end - range.start => Ok(b),
            Ok(b) => Err(Error::corrupt(format!(
                "{key} in {} is shorter than its references: wanted bytes {}..{}, got {}",
                self.url,
                range.start,
                range.end,
                b.len()
            ))),
            Err(object_store::Error::NotFound { .. }) => Err(Error::corrupt(format!(
                "{key} is missing from {}, but a backup needs it",
                self.url
            ))),
            Err(e) => Err(self.storage_error("cannot read", key, e)),
        }
    }

    /// Writes `data` under `key` unless something is already there; returns
    /// only once the object is durable. Refused on a store that would
    /// overwrite instead.
    pub async fn put_new(&self, key: &Key, data: impl Into<PutPayload>) -> Result<Created> {
        self.ensure_create_only().await?;
        self.put_create(key, data.into()).await
    }

    async fn put_create(&self, key: &Key, data: PutPayload) -> Result<Created> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self.store.put_opts(key, data, opts).await {
            Ok(_) => Ok(Created::New),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Created::AlreadyExists),
            Err(e) => Err(self.storage_error("cannot write", key, e)),
        }
    }

    /// Replaces an object; only for repairing one that fails its own checks.
    pub async fn put_replace(&self, key: &Key, data: impl Into<PutPayload>) -> Result<()> {
        self.store
            .put(key, data.into())
            .await
            .map(|_| ())
            .map_err(|e| self.storage_error("cannot write", key, e))
    }

    pub async fn delete(&self, key: &Key) -> Result<()> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.storage_error("cannot delete", key, e)),
        }
    }

    /// Every object under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let key = Key::from(prefix);
        self.store
            .list(Some(&key))
            .try_collect()
            .await
            .map_err(|e| self.storage_error("cannot list", &key, e))
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

/// Store errors can carry the S3 response body, which echoes the access key
/// id, the signature and the string signed: keep only its code and message.
pub fn redact(text: &str) -> String {
    let tag = |name: &str| -> Option<String> {
        let open = format!("<{name}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find('<')? + start;
        Some(text[start..end].to_string())
    };
    match text.find('<') {
        None => text.to_string(),
        Some(cut) => {
            let mut out = text[..cut].trim_end().trim_end_matches(':').to_string();
            if let Some(code) = tag("Code") {
                out.push_str(&format!(": {code}"));
            }
            if let Some(message) = tag("Message") {
                out.push_str(&format!(" ({message})"));
            }
            out
        }
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

    #[test]
    fn redacts_s3_bodies() {
        let e = "Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?><Error>\
                 <Code>SignatureDoesNotMatch</Code><Message>bad sig</Message>\
                 <AWSAccessKeyId>AKIAEXAMPLE</AWSAccessKeyId><SignatureProvided>abc</SignatureProvided></Error>";
        let r = super::redact(e);
        assert!(!r.contains("AKIAEXAMPLE") && !r.contains("abc<"), "{r}");
        assert!(
            r.contains("403 Forbidden")
                && r.contains("SignatureDoesNotMatch")
                && r.contains("bad sig"),
            "{r}"
        );
        assert_eq!(super::redact("plain"), "plain");
    }
}
