//! What the drivers share: objects kept by an `object_store` store (the
//! filesystem, S3, or memory), with errors that name the key and the
//! repository and never a secret.

use super::{Created, ObjectInfo, ObjectReader, Payload, redact};
use crate::error::{Error, Result};
use crate::format::key::Key;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::sync::Arc;

pub(super) struct Objects {
    pub(super) store: Arc<dyn ObjectStore>,
    /// The repository, as errors name it.
    pub(super) url: String,
}

pub(super) fn path(key: &Key) -> Path {
    Path::from(key.as_str())
}

/// Where the S3 client looks for credentials when the environment has none.
const INSTANCE_METADATA: &str = "169.254.169.254";

fn payload(data: Payload) -> PutPayload {
    data.parts().iter().cloned().collect()
}

impl Objects {
    pub(super) fn new(store: Arc<dyn ObjectStore>, url: impl std::fmt::Display) -> Objects {
        Objects {
            store,
            url: url.to_string(),
        }
    }

    fn storage_error(&self, action: &str, key: &Key, e: object_store::Error) -> Error {
        let said = redact(&e.to_string());
        // With no credentials in the environment, the S3 client asks the
        // cloud's instance metadata service; off the cloud, that failure
        // says nothing a user can act on.
        let hint = match said.contains(INSTANCE_METADATA) {
            true => {
                " (no S3 credentials were found: set AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY, or run where an instance role provides them)"
            }
            false => "",
        };
        Error::io(format!("{action} {key} in {}: {said}{hint}", self.url))
    }

    pub(super) async fn get(&self, key: &Key) -> Result<Option<Bytes>> {
        let result = match self.store.get(&path(key)).await {
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

    pub(super) async fn read(&self, key: &Key) -> Result<Option<ObjectReader>> {
        match self.store.get(&path(key)).await {
            Ok(r) => {
                let size = r.meta.size;
                Ok(Some(match r.payload {
                    object_store::GetResultPayload::File(file, _) => ObjectReader::file(file, size),
                    object_store::GetResultPayload::Stream(stream) => ObjectReader::stream(
                        stream.map_err(|e| redact(&e.to_string())).boxed(),
                        size,
                    ),
                }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.storage_error("cannot read", key, e)),
        }
    }

    pub(super) async fn get_range(&self, key: &Key, range: std::ops::Range<u64>) -> Result<Bytes> {
        match self.store.get_range(&path(key), range.clone()).await {
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

    /// A create-only write, as the store does it (the caller knows whether
    /// the store honours it).
    pub(super) async fn put_create(&self, key: &Key, data: Payload) -> Result<Created> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self.store.put_opts(&path(key), payload(data), opts).await {
            Ok(_) => Ok(Created::New),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Created::AlreadyExists),
            Err(e) => Err(self.storage_error("cannot write", key, e)),
        }
    }

    pub(super) async fn put_replace(&self, key: &Key, data: Payload) -> Result<()> {
        self.store
            .put(&path(key), payload(data))
            .await
            .map(|_| ())
            .map_err(|e| self.storage_error("cannot write", key, e))
    }

    pub(super) async fn delete(&self, key: &Key) -> Result<()> {
        match self.store.delete(&path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.storage_error("cannot delete", key, e)),
        }
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let key = Key::from(prefix);
        self.store
            .list(Some(&path(&key)))
            .map_ok(|meta| ObjectInfo {
                key: Key::from(meta.location.as_ref()),
                size: meta.size,
                last_modified: meta.last_modified,
            })
            .try_collect()
            .await
            .map_err(|e| self.storage_error("cannot list", &key, e))
    }
}

/// Implements [`super::Store`] for an object_store driver: the methods
/// every one does the same way, over its `objects` field, and its own.
macro_rules! impl_store {
    ($driver:ty { $($own:tt)* }) => {
        #[async_trait::async_trait]
        impl super::Store for $driver {
        async fn get(&self, key: &Key) -> Result<Option<Bytes>> {
            self.objects.get(key).await
        }

        async fn get_range(&self, key: &Key, range: std::ops::Range<u64>) -> Result<Bytes> {
            self.objects.get_range(key, range).await
        }

        async fn read(&self, key: &Key) -> Result<Option<ObjectReader>> {
            self.objects.read(key).await
        }

        async fn put_replace(&self, key: &Key, data: Payload) -> Result<()> {
            self.objects.put_replace(key, data).await
        }

        async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
            self.objects.list(prefix).await
        }

        async fn delete(&self, key: &Key) -> Result<()> {
            self.objects.delete(key).await
        }

        $($own)*
        }
    };
}
pub(super) use impl_store;

#[cfg(test)]
mod tests {
    use super::*;

    /// An S3 client without credentials reports the cloud's metadata
    /// service; the error names what the user is missing.
    #[test]
    fn a_store_without_credentials_says_so() {
        let objects = Objects::new(
            Arc::new(object_store::memory::InMemory::new()),
            "s3://bucket/repo",
        );
        let key = Key::from("walvault.json");
        let e = object_store::Error::Generic {
            store: "S3",
            source: "Error performing PUT http://169.254.169.254/latest/api/token: 403".into(),
        };
        let said = objects.storage_error("cannot read", &key, e).to_string();
        assert!(said.contains("no S3 credentials were found"), "{said}");
        let e = object_store::Error::Generic {
            store: "S3",
            source: "connection refused".into(),
        };
        let said = objects.storage_error("cannot read", &key, e).to_string();
        assert!(!said.contains("credentials"), "{said}");
    }
}
