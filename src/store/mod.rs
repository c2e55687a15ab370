//! Where objects are kept: one seam, [`Store`], and its drivers.
//!
//! Every write is a create that never replaces what is there (a hard link on
//! the filesystem, `If-None-Match: *` on S3, proven honoured by the store
//! before it is relied on), so two writers can never silently overwrite each
//! other; the filesystem store fsyncs the file and its directory before a
//! write is reported done. Only this module knows how: nothing outside it
//! names `object_store`, a file of the repository, or a driver.

pub mod local;
pub mod memory;
mod objects;
pub mod prefixed;
mod probe;
pub mod s3;
mod url;

pub use local::{LEFTOVER_AGE, Leftover};
pub use url::RepoUrl;

use crate::error::{Error, Result};
use crate::format::key::Key;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use std::sync::Arc;

/// What a create-only write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New,
    AlreadyExists,
}

/// What a listing tells of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: Key,
    pub size: u64,
    pub last_modified: chrono::DateTime<chrono::Utc>,
}

/// The bytes of an object to write, in the pieces they were made in; cheap
/// to clone (the pieces are shared).
#[derive(Debug, Clone, Default)]
pub struct Payload(Arc<[Bytes]>);

impl Payload {
    pub fn parts(&self) -> &[Bytes] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All of it in one piece (a copy unless it is one piece already).
    pub fn to_bytes(&self) -> Bytes {
        match &*self.0 {
            [] => Bytes::new(),
            [one] => one.clone(),
            parts => Bytes::from(parts.concat()),
        }
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Payload {
        Payload(Arc::new([b]))
    }
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Payload {
        Payload::from(Bytes::from(v))
    }
}

impl From<&'static [u8]> for Payload {
    fn from(s: &'static [u8]) -> Payload {
        Payload::from(Bytes::from_static(s))
    }
}

impl From<Vec<Bytes>> for Payload {
    fn from(parts: Vec<Bytes>) -> Payload {
        Payload(parts.into())
    }
}

/// Delivers the next piece of an object onto the end of the buffer: how
/// many bytes it added, 0 at the end. Errors say why the store could not
/// deliver it (never the object's own damage).
pub type Fill<'a> = dyn FnMut(&mut BytesMut) -> std::result::Result<usize, String> + Send + 'a;

/// An object being read, of a known size. Its bytes are fed to a consumer
/// on a blocking thread ([`ObjectReader::feed`]), read in large pieces in
/// place from a local file, or as they arrive from a remote store.
pub struct ObjectReader {
    size: u64,
    body: Body,
}

enum Body {
    File(std::fs::File),
    Stream(futures::stream::BoxStream<'static, std::result::Result<Bytes, String>>),
}

impl ObjectReader {
    pub(crate) fn file(file: std::fs::File, size: u64) -> ObjectReader {
        ObjectReader {
            size,
            body: Body::File(file),
        }
    }

    pub(crate) fn stream(
        stream: futures::stream::BoxStream<'static, std::result::Result<Bytes, String>>,
        size: u64,
    ) -> ObjectReader {
        ObjectReader {
            size,
            body: Body::Stream(stream),
        }
    }

    /// The object's size, as the store reports it.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Runs `consume` on a blocking thread with a [`Fill`] over the object's
    /// bytes. A streamed body is read here meanwhile; the channel bounds what
    /// waits in between. A body that ends short of its size is the store's
    /// failure (a connection cut short), not damage.
    pub async fn feed<T: Send + 'static>(
        self,
        consume: impl FnOnce(&mut Fill<'_>) -> T + Send + 'static,
    ) -> std::result::Result<T, tokio::task::JoinError> {
        self.feed_to(consume, false).await
    }

    /// Like [`ObjectReader::feed`], but a local file is read on this
    /// thread, without handing it to another: for a caller that does
    /// nothing else meanwhile (a fetch), not for one running many reads at
    /// once (a prefetch).
    pub async fn feed_here<T: Send + 'static>(
        self,
        consume: impl FnOnce(&mut Fill<'_>) -> T + Send + 'static,
    ) -> std::result::Result<T, tokio::task::JoinError> {
        self.feed_to(consume, true).await
    }

    async fn feed_to<T: Send + 'static>(
        self,
        consume: impl FnOnce(&mut Fill<'_>) -> T + Send + 'static,
        here: bool,
    ) -> std::result::Result<T, tokio::task::JoinError> {
        let size = self.size;
        match self.body {
            Body::File(mut file) if here => Ok(consume(&mut |buf: &mut BytesMut| {
                read_piece(&mut file, buf)
            })),
            Body::File(mut file) => {
                tokio::task::spawn_blocking(move || {
                    consume(&mut |buf: &mut BytesMut| read_piece(&mut file, buf))
                })
                .await
            }
            Body::Stream(mut stream) => {
                let (tx, mut rx) =
                    tokio::sync::mpsc::channel::<std::result::Result<Bytes, String>>(16);
                let decoding = tokio::task::spawn_blocking(move || {
                    let mut received = 0u64;
                    consume(&mut |buf: &mut BytesMut| match rx.blocking_recv() {
                        Some(Ok(piece)) => {
                            buf.extend_from_slice(&piece);
                            received += piece.len() as u64;
                            Ok(piece.len().max(1)) // an empty piece is not the end
                        }
                        Some(Err(e)) => Err(e),
                        None if received < size => {
                            Err(format!("the store sent {received} of its {size} bytes"))
                        }
                        None => Ok(0),
                    })
                });
                let pump = async move {
                    while let Some(piece) = stream.next().await {
                        if tx.send(piece).await.is_err() {
                            break;
                        }
                    }
                };
                let (decoded, ()) = tokio::join!(decoding, pump);
                decoded
            }
        }
    }
}

/// Reads the next piece of a local object onto the end of `buf`, in place.
fn read_piece(file: &mut std::fs::File, buf: &mut BytesMut) -> std::result::Result<usize, String> {
    const PIECE: usize = 256 << 10;
    if buf.capacity() - buf.len() < 8 << 10 {
        buf.reserve(PIECE);
    }
    crate::sys::read_appending(file, buf, PIECE).map_err(|e| e.to_string())
}

/// Where an object is made while it is written ([`Store::stage`]): a file
/// the store will publish as it is, or nothing (the object is made in
/// memory and written whole).
pub struct Staging {
    file: Option<local::StagedFile>,
}

impl Staging {
    /// No file: the object is made in memory.
    pub fn in_memory() -> Staging {
        Staging { file: None }
    }

    /// The file to write the object into as it is made; `None` when it is
    /// to be made in memory and handed to [`Store::put_staged`] whole.
    pub fn file(&self) -> Option<&std::fs::File> {
        self.file.as_ref().map(|s| s.file())
    }
}

/// A place that keeps objects under [`Key`]s. Errors name the key and the
/// repository, never a secret.
#[async_trait]
pub trait Store: Send + Sync {
    /// A whole object; `None` when there is none.
    async fn get(&self, key: &Key) -> Result<Option<Bytes>>;

    /// `range` of an object; a missing object, or one shorter than the
    /// range, is damage here, since only manifests point into objects by
    /// range.
    async fn get_range(&self, key: &Key, range: std::ops::Range<u64>) -> Result<Bytes>;

    /// An object to read as it arrives; `None` when there is none.
    async fn read(&self, key: &Key) -> Result<Option<ObjectReader>>;

    /// Writes `data` under `key` unless something is already there; returns
    /// only once the object is durable. Refused on a store that would
    /// overwrite instead.
    async fn put_new(&self, key: &Key, data: Payload) -> Result<Created>;

    /// Where to make the object for `key` while it is written; by default
    /// in memory.
    fn stage(&self, _key: &Key) -> Staging {
        Staging::in_memory()
    }

    /// Writes an object made in `staging` (or, made in memory, `parts`)
    /// under `key` unless something is already there, like `put_new`. When
    /// the name is taken, our object comes back, for the caller to compare
    /// with what is there.
    async fn put_staged(
        &self,
        key: &Key,
        staging: Staging,
        parts: Payload,
    ) -> Result<Option<Payload>> {
        let ours = match staging.file {
            Some(staged) => Payload::from(staged.read_back(key)?),
            None => parts,
        };
        Ok(match self.put_new(key, ours.clone()).await? {
            Created::New => None,
            Created::AlreadyExists => Some(ours),
        })
    }

    /// Replaces an object; only for repairing one that fails its own checks
    /// and for records that are rewritten in place.
    async fn put_replace(&self, key: &Key, data: Payload) -> Result<()>;

    /// Every object under `prefix` (all of them for "").
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;

    /// Deletes an object; one already gone is fine.
    async fn delete(&self, key: &Key) -> Result<()>;

    /// Makes an object found already stored durable (the write that stored
    /// it may have been killed before it made it so). Nothing to do where a
    /// completed write is durable.
    async fn make_durable(&self, _key: &Key) -> Result<()> {
        Ok(())
    }

    /// What writes killed mid-way left behind, unwritten for
    /// [`LEFTOVER_AGE`]; none where every write stores all or nothing.
    async fn leftovers(&self) -> Result<Vec<Leftover>> {
        Ok(vec![])
    }

    /// Deletes a leftover; one already gone is fine.
    fn delete_leftover(&self, _leftover: &Leftover) -> Result<()> {
        Ok(())
    }
}

/// The driver for `url`. A missing local directory is created only when
/// `create` is set (push), so a typo'd path on read is an error, not an
/// empty archive.
pub fn open(url: &RepoUrl, create: bool) -> Result<Arc<dyn Store>> {
    Ok(match url {
        RepoUrl::Local(root) => Arc::new(local::LocalStore::open(root, create, url)?),
        RepoUrl::S3 { .. } => Arc::new(s3::S3Store::open(url)?),
    })
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

fn task_failed(e: tokio::task::JoinError) -> Error {
    Error::io(format!("storage task failed: {e}"))
}

#[cfg(test)]
mod tests {
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
