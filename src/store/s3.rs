//! The S3 driver: a repository in a bucket, under a prefix.
//!
//! A create-only write is a PUT with `If-None-Match: *`, relied on only once
//! the store is proven to honour it (see `probe`); a completed PUT is
//! durable, and stores all of the object or nothing.

use super::objects::{Objects, impl_store};
use super::{Created, ObjectInfo, ObjectReader, Payload, RepoUrl};
use crate::error::{Error, Result};
use crate::format::key::Key;
use bytes::Bytes;
use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::prefix::PrefixStore;
use std::sync::Arc;

pub use super::probe::s3_store_name;

/// A repository in an S3 bucket (or a store that speaks S3).
pub struct S3Store {
    pub(super) objects: Objects,
    /// The store create-only writes must be proven on, as the probe names it.
    pub(super) store_name: String,
    pub(super) create_only: tokio::sync::OnceCell<()>,
}

impl S3Store {
    /// The bucket and prefix `url` names, with credentials and endpoint
    /// from the environment (AWS_*).
    pub fn open(url: &RepoUrl) -> Result<S3Store> {
        let RepoUrl::S3 { bucket, prefix } = url else {
            return Err(Error::usage(format!("{url} is not an S3 repository")));
        };
        let builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
        let store_name = s3_store_name(endpoint.as_deref());
        let s3 = builder
            .build()
            .map_err(|e| Error::usage(format!("cannot configure S3 for {url}: {e}")))?;
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(PrefixStore::new(s3, prefix.as_str()))
        };
        Ok(S3Store::over(store, url, store_name))
    }

    /// The repository at `url` kept by `store`, named `store_name`.
    pub(super) fn over(store: Arc<dyn ObjectStore>, url: &RepoUrl, store_name: String) -> S3Store {
        S3Store {
            objects: Objects::new(store, url),
            store_name,
            create_only: tokio::sync::OnceCell::new(),
        }
    }
}

impl_store!(S3Store {

    async fn put_new(&self, key: &Key, data: Payload) -> Result<Created> {
        self.ensure_create_only().await?;
        self.objects.put_create(key, data).await
    }
});
