//! Proof that the store honours create-only writes.
//!
//! On S3 a create-only write is a PUT with `If-None-Match: *`. A store that
//! ignores the header answers 200 and replaces what was there: a re-pushed
//! segment with other bytes would overwrite archived WAL, and two holders
//! could both "create" the repository lock. So before its first create-only
//! write, a process makes sure the store refuses a second create of the same
//! name, once per repository: the proof is remembered in
//! [`PROBE_RECORD_KEY`], naming the store it was made on, and made again
//! when the repository is reached through another store.

use super::s3::S3Store;
use super::{Created, Payload};
use crate::error::{Error, Result};
use crate::format::key::{Key, PROBE_RECORD_KEY, probe_key};
use bytes::Bytes;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct ProbeRecord {
    /// The store the probe ran on: its endpoint, or "AWS S3".
    store: String,
    checked_at: chrono::DateTime<chrono::Utc>,
    by: String,
}

/// The store behind an S3 URL as the probe names it: the endpoint without
/// anything secret in it (user, password, query), or AWS itself.
pub fn s3_store_name(endpoint: Option<&str>) -> String {
    let Some(endpoint) = endpoint else {
        return "AWS S3".into();
    };
    match url::Url::parse(endpoint) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.as_str().trim_end_matches('/').to_string()
        }
        Err(_) => "the endpoint in AWS_ENDPOINT_URL".into(),
    }
}

impl S3Store {
    /// Returns once this repository's store is known to refuse a second
    /// create of one name; an error when it overwrites instead.
    pub(super) async fn ensure_create_only(&self) -> Result<()> {
        self.create_only
            .get_or_try_init(|| self.probe_create_only(&self.store_name))
            .await
            .map(|_| ())
    }

    async fn probe_create_only(&self, store: &str) -> Result<()> {
        let record_key = Key::from(PROBE_RECORD_KEY);
        if let Some(bytes) = self.objects.get(&record_key).await? {
            // A record that does not parse is only a cache lost: probe again.
            if serde_json::from_slice::<ProbeRecord>(&bytes).is_ok_and(|r| r.store == store) {
                return Ok(());
            }
        }
        let since = chrono::Utc::now();
        let key = probe_key(std::process::id(), since.timestamp_nanos_opt().unwrap_or(0));
        let first = self
            .objects
            .put_create(&key, Payload::from(Bytes::from_static(b"first")))
            .await;
        let second = match first {
            Ok(_) => {
                self.objects
                    .put_create(&key, Payload::from(Bytes::from_static(b"second")))
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = self.objects.store.delete(&super::objects::path(&key)).await {
            tracing::debug!("cannot delete the probe object {key}: {e}");
        }
        if second? == Created::New {
            return Err(Error::usage(format!(
                "refusing to write to {}: the store at {store} ignores conditional PUT \
                 (If-None-Match: *) and overwrote a probe object, so it could replace archived \
                 WAL and cannot hold the repository lock; nothing was written: use a store \
                 that supports conditional writes (AWS S3 does) or a filesystem repository",
                self.objects.url
            )));
        }
        let record = ProbeRecord {
            store: store.to_string(),
            checked_at: since,
            by: format!("walvault {}", env!("CARGO_PKG_VERSION")),
        };
        let json = serde_json::to_vec_pretty(&record).expect("record serializes");
        self.objects
            .put_replace(&record_key, Payload::from(json))
            .await?;
        tracing::info!(
            "{}: the store at {store} refuses a second create of one name \
             (If-None-Match: *); recorded in {PROBE_RECORD_KEY}",
            self.objects.url
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::Repository;
    use crate::store::RepoUrl;
    use futures::stream::BoxStream;
    use object_store::memory::InMemory;
    use object_store::path::Path;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
        PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
    };
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    type Fut<'a, T> = Pin<Box<dyn Future<Output = object_store::Result<T>> + Send + 'a>>;

    /// An in-memory store that counts its writes and, unless it honours
    /// create-only, replaces objects a create-only write names, as some
    /// S3-compatible stores do.
    #[derive(Debug, Default)]
    struct TestStore {
        inner: InMemory,
        overwrites: bool,
        puts: AtomicUsize,
    }

    impl std::fmt::Display for TestStore {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "TestStore(overwrites: {})", self.overwrites)
        }
    }

    impl ObjectStore for TestStore {
        fn put_opts<'a, 'b, 'c>(
            &'a self,
            location: &'b Path,
            payload: PutPayload,
            mut opts: PutOptions,
        ) -> Fut<'c, PutResult>
        where
            'a: 'c,
            'b: 'c,
            Self: 'c,
        {
            self.puts.fetch_add(1, Ordering::SeqCst);
            if self.overwrites {
                opts.mode = PutMode::Overwrite;
            }
            self.inner.put_opts(location, payload, opts)
        }

        fn put_multipart_opts<'a, 'b, 'c>(
            &'a self,
            location: &'b Path,
            opts: PutMultipartOptions,
        ) -> Fut<'c, Box<dyn MultipartUpload>>
        where
            'a: 'c,
            'b: 'c,
            Self: 'c,
        {
            self.inner.put_multipart_opts(location, opts)
        }

        fn get_opts<'a, 'b, 'c>(
            &'a self,
            location: &'b Path,
            options: GetOptions,
        ) -> Fut<'c, GetResult>
        where
            'a: 'c,
            'b: 'c,
            Self: 'c,
        {
            self.inner.get_opts(location, options)
        }

        fn delete_stream(
            &self,
            locations: BoxStream<'static, object_store::Result<Path>>,
        ) -> BoxStream<'static, object_store::Result<Path>> {
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(prefix)
        }

        fn list_with_delimiter<'a, 'b, 'c>(
            &'a self,
            prefix: Option<&'b Path>,
        ) -> Fut<'c, ListResult>
        where
            'a: 'c,
            'b: 'c,
            Self: 'c,
        {
            self.inner.list_with_delimiter(prefix)
        }

        fn copy_opts<'a, 'b, 'd, 'c>(
            &'a self,
            from: &'b Path,
            to: &'d Path,
            options: CopyOptions,
        ) -> Fut<'c, ()>
        where
            'a: 'c,
            'b: 'c,
            'd: 'c,
            Self: 'c,
        {
            self.inner.copy_opts(from, to, options)
        }
    }

    fn repo_on(store: &Arc<TestStore>, endpoint: &str) -> Repository {
        let url = RepoUrl::parse("s3://walvault-probe/repo").unwrap();
        let s3 = S3Store::over(store.clone(), &url, s3_store_name(Some(endpoint)));
        Repository::with_store(Arc::new(s3), url)
    }

    async fn keys(store: &TestStore) -> Vec<String> {
        use futures::TryStreamExt;
        let mut keys: Vec<String> = store
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        keys.sort();
        keys
    }

    #[tokio::test]
    async fn a_store_that_overwrites_gets_no_push_and_no_lock() {
        let store = Arc::new(TestStore {
            overwrites: true,
            ..Default::default()
        });
        let repo = repo_on(&store, "http://user:hunter2@10.0.0.9:9000/?x=1");
        let key = Key::from("wal/0000000100000000/000000010000000000000001.zst");
        let e = repo
            .put_new(&key, Bytes::from_static(b"wal"))
            .await
            .unwrap_err();
        let m = e.message();
        assert_eq!(e.kind, crate::error::ErrorKind::Usage);
        assert!(
            m.contains("If-None-Match: *")
                && m.contains("http://10.0.0.9:9000")
                && m.contains("s3://walvault-probe/repo")
                && !m.contains("hunter2"),
            "{m}"
        );
        let e = crate::repository::lock::RepoLock::acquire(&repo, "prune")
            .await
            .err()
            .expect("no lock on a store that overwrites");
        assert!(e.message().contains("If-None-Match: *"), "{e}");
        // Neither the object, nor the lock, nor a probe or a record remains.
        assert_eq!(keys(&store).await, Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_store_that_honours_create_only_is_probed_once() {
        let store = Arc::new(TestStore::default());
        let repo = repo_on(&store, "http://127.0.0.1:9000");
        let a = Key::from("a");
        assert_eq!(
            repo.put_new(&a, Bytes::from_static(b"1")).await.unwrap(),
            Created::New
        );
        // Two probe puts, the record, the object.
        assert_eq!(store.puts.load(Ordering::SeqCst), 4);
        assert_eq!(keys(&store).await, vec!["a", PROBE_RECORD_KEY]);
        assert_eq!(
            repo.put_new(&a, Bytes::from_static(b"2")).await.unwrap(),
            Created::AlreadyExists
        );
        assert_eq!(store.puts.load(Ordering::SeqCst), 5);
        // Another process on the same store reads the record and probes no more.
        let again = repo_on(&store, "http://127.0.0.1:9000");
        let lock = crate::repository::lock::RepoLock::acquire(&again, "prune")
            .await
            .unwrap();
        lock.release().await.unwrap();
        assert_eq!(store.puts.load(Ordering::SeqCst), 6);
        // Reached through another store (a copy of the bucket elsewhere): probed again.
        let elsewhere = repo_on(&store, "https://s3.example.net");
        elsewhere
            .put_new(&Key::from("b"), Bytes::from_static(b"3"))
            .await
            .unwrap();
        assert_eq!(store.puts.load(Ordering::SeqCst), 10);
        assert_eq!(keys(&store).await, vec!["a", "b", PROBE_RECORD_KEY]);
    }
}
