//! A store seen from inside one of its folders: every key gets the folder's
//! prefix on the way in and loses it on the way out. A repository that
//! holds several clusters (docs/format.md, "Clusters") keeps each later
//! cluster's objects in a folder of its own, and every command works on a
//! cluster through this view exactly as on a repository of one cluster.

use super::{Created, Leftover, ObjectInfo, ObjectReader, Payload, Staging, Store};
use crate::error::Result;
use crate::format::key::Key;
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;

pub struct PrefixedStore {
    inner: Arc<dyn Store>,
    /// Ends with `/`.
    prefix: String,
}

impl PrefixedStore {
    /// The view of `inner` under `folder` (a key prefix without a trailing
    /// `/`, never empty).
    pub fn new(inner: Arc<dyn Store>, folder: &str) -> PrefixedStore {
        PrefixedStore {
            inner,
            prefix: format!("{}/", folder.trim_end_matches('/')),
        }
    }

    fn outer(&self, key: &Key) -> Key {
        Key::from(format!("{}{key}", self.prefix))
    }
}

#[async_trait]
impl Store for PrefixedStore {
    async fn get(&self, key: &Key) -> Result<Option<Bytes>> {
        self.inner.get(&self.outer(key)).await
    }

    async fn get_range(&self, key: &Key, range: std::ops::Range<u64>) -> Result<Bytes> {
        self.inner.get_range(&self.outer(key), range).await
    }

    async fn read(&self, key: &Key) -> Result<Option<ObjectReader>> {
        self.inner.read(&self.outer(key)).await
    }

    async fn put_new(&self, key: &Key, data: Payload) -> Result<Created> {
        self.inner.put_new(&self.outer(key), data).await
    }

    fn stage(&self, key: &Key) -> Staging {
        self.inner.stage(&self.outer(key))
    }

    async fn put_staged(
        &self,
        key: &Key,
        staging: Staging,
        parts: Payload,
    ) -> Result<Option<Payload>> {
        self.inner
            .put_staged(&self.outer(key), staging, parts)
            .await
    }

    async fn put_replace(&self, key: &Key, data: Payload) -> Result<()> {
        self.inner.put_replace(&self.outer(key), data).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let listed = self.inner.list(&format!("{}{prefix}", self.prefix)).await?;
        Ok(listed
            .into_iter()
            .filter_map(|mut info| {
                let inner = info.key.as_str().strip_prefix(&self.prefix)?.to_string();
                info.key = Key::from(inner);
                Some(info)
            })
            .collect())
    }

    async fn delete(&self, key: &Key) -> Result<()> {
        self.inner.delete(&self.outer(key)).await
    }

    async fn make_durable(&self, key: &Key) -> Result<()> {
        self.inner.make_durable(&self.outer(key)).await
    }

    // Leftovers are files of the whole store, found by age: the
    // repository's root finds every folder's, so a folder reports none of
    // its own (each would be counted once per cluster).
    async fn leftovers(&self) -> Result<Vec<Leftover>> {
        Ok(Vec::new())
    }

    fn delete_leftover(&self, leftover: &Leftover) -> Result<()> {
        self.inner.delete_leftover(leftover)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RepoUrl;
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn a_view_sees_and_writes_only_its_folder() {
        let url = RepoUrl::S3 {
            bucket: "b".into(),
            prefix: String::new(),
        };
        let root: Arc<dyn Store> = Arc::new(MemoryStore::named(&url));
        let view = PrefixedStore::new(root.clone(), "clusters/16-42");
        root.put_new(&Key::from("wal/a.zst"), Payload::from(b"root".as_slice()))
            .await
            .unwrap();
        view.put_new(&Key::from("wal/a.zst"), Payload::from(b"view".as_slice()))
            .await
            .unwrap();
        assert_eq!(
            view.get(&Key::from("wal/a.zst")).await.unwrap().unwrap(),
            Bytes::from_static(b"view")
        );
        assert_eq!(
            root.get(&Key::from("clusters/16-42/wal/a.zst"))
                .await
                .unwrap()
                .unwrap(),
            Bytes::from_static(b"view")
        );
        let listed: Vec<String> = view
            .list("wal")
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.key.to_string())
            .collect();
        assert_eq!(listed, ["wal/a.zst"]);
        // The root's own listing of wal/ does not reach into the folder.
        let listed: Vec<String> = root
            .list("wal")
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.key.to_string())
            .collect();
        assert_eq!(listed, ["wal/a.zst"]);
        view.delete(&Key::from("wal/a.zst")).await.unwrap();
        assert!(root.get(&Key::from("wal/a.zst")).await.unwrap().is_some());
        assert!(view.get(&Key::from("wal/a.zst")).await.unwrap().is_none());
    }
}
