//! The in-memory driver: a repository that lives as long as the process,
//! for tests that run in-process. It honours create-only writes as a
//! filesystem or a conforming S3 store does.

use super::objects::{Objects, impl_store};
use super::{Created, ObjectInfo, ObjectReader, Payload};
use crate::error::Result;
use crate::format::key::Key;
use bytes::Bytes;
use object_store::memory::InMemory;
use std::sync::Arc;

/// A repository in memory.
pub struct MemoryStore {
    objects: Objects,
}

impl MemoryStore {
    /// An empty store; errors name it `name`.
    pub fn named(name: impl std::fmt::Display) -> MemoryStore {
        MemoryStore {
            objects: Objects::new(Arc::new(InMemory::new()), name),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> MemoryStore {
        MemoryStore::named("memory")
    }
}

impl_store!(MemoryStore {

    async fn put_new(&self, key: &Key, data: Payload) -> Result<Created> {
        self.objects.put_create(key, data).await
    }
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::store::Store;

    fn key(s: &str) -> Key {
        Key::from(s)
    }

    #[tokio::test]
    async fn create_only_refuses_a_second_put() {
        let store = MemoryStore::default();
        let k = key("wal/0000000100000000/000000010000000000000001.zst");
        let first = Payload::from(Bytes::from_static(b"first"));
        assert_eq!(store.put_new(&k, first).await.unwrap(), Created::New);
        let second = Payload::from(Bytes::from_static(b"second"));
        assert_eq!(
            store.put_new(&k, second).await.unwrap(),
            Created::AlreadyExists
        );
        assert_eq!(store.get(&k).await.unwrap().unwrap(), &b"first"[..]);
    }

    #[tokio::test]
    async fn replace_overwrites() {
        let store = MemoryStore::default();
        let k = key("retention.json");
        store.put_replace(&k, b"one".to_vec().into()).await.unwrap();
        store.put_replace(&k, b"two".to_vec().into()).await.unwrap();
        assert_eq!(store.get(&k).await.unwrap().unwrap(), &b"two"[..]);
    }

    #[tokio::test]
    async fn missing_objects() {
        let store = MemoryStore::default();
        let k = key("packs/ab/nothing.pack");
        assert_eq!(store.get(&k).await.unwrap(), None);
        assert!(store.read(&k).await.unwrap().is_none());
        // Deleting what is not there is fine.
        store.delete(&k).await.unwrap();
        let e = store.get_range(&k, 0..4).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt);
        assert!(e.message().contains("is missing from memory"), "{e}");
    }

    #[tokio::test]
    async fn ranged_gets() {
        let store = MemoryStore::default();
        let k = key("packs/ab/x.pack");
        store
            .put_new(
                &k,
                Payload::from(vec![
                    Bytes::from_static(b"0123"),
                    Bytes::from_static(b"4567"),
                ]),
            )
            .await
            .unwrap();
        assert_eq!(store.get_range(&k, 2..6).await.unwrap(), &b"2345"[..]);
        let e = store.get_range(&k, 4..12).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt);
        assert!(e.message().contains("shorter than its references"), "{e}");
        // Starting past the end: the store refuses the range itself.
        let e = store.get_range(&k, 20..24).await.unwrap_err();
        assert!(
            e.message()
                .contains("cannot read packs/ab/x.pack in memory"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn lists_deletes_and_reads() {
        let store = MemoryStore::default();
        for k in ["wal/a/1.zst", "wal/a/2.zst", "packs/ab/p.pack"] {
            store
                .put_new(&key(k), Payload::from(k.as_bytes().to_vec()))
                .await
                .unwrap();
        }
        let mut listed: Vec<_> = store.list("wal").await.unwrap();
        listed.sort_by(|a, b| a.key.cmp(&b.key));
        let keys: Vec<_> = listed.iter().map(|i| (i.key.as_str(), i.size)).collect();
        assert_eq!(keys, vec![("wal/a/1.zst", 11), ("wal/a/2.zst", 11)]);
        assert_eq!(store.list("").await.unwrap().len(), 3);
        store.delete(&key("wal/a/1.zst")).await.unwrap();
        assert_eq!(store.list("wal").await.unwrap().len(), 1);

        let reader = store.read(&key("packs/ab/p.pack")).await.unwrap().unwrap();
        assert_eq!(reader.size(), 15);
        let got = reader
            .feed(|fill| {
                let mut buf = bytes::BytesMut::new();
                while fill(&mut buf).unwrap() > 0 {}
                buf.freeze()
            })
            .await
            .unwrap();
        assert_eq!(got, &b"packs/ab/p.pack"[..]);
    }

    #[tokio::test]
    async fn staged_puts_without_a_file_are_create_only() {
        let store = MemoryStore::default();
        let k = key("wal/a/1.zst");
        let staging = store.stage(&k);
        assert!(staging.file().is_none());
        let ours = Payload::from(Bytes::from_static(b"ours"));
        assert!(store.put_staged(&k, staging, ours).await.unwrap().is_none());
        let again = Payload::from(Bytes::from_static(b"again"));
        let taken = store.put_staged(&k, store.stage(&k), again).await.unwrap();
        assert_eq!(taken.unwrap().to_bytes(), &b"again"[..]);
        assert_eq!(store.get(&k).await.unwrap().unwrap(), &b"ours"[..]);
    }
}
