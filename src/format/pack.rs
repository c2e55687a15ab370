//! Packs: many blobs (compressed, self-verifying chunks of file content) in
//! one stored object, so a backup of thousands of small files is a handful
//! of requests, and a blob is found again by its sha256 (docs/format.md).

use crate::error::{Error, Result};
use crate::format::manifest::{ChunkRef, Manifest};
use crate::format::object::Sha256Digest;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::mpsc;

/// Where each blob already in the repository lives, from every manifest.
#[derive(Default)]
pub struct BlobIndex {
    blobs: Mutex<HashMap<Sha256Digest, ChunkRef>>,
}

impl BlobIndex {
    pub fn from_manifests<'a>(manifests: impl IntoIterator<Item = &'a Manifest>) -> BlobIndex {
        let mut blobs = HashMap::new();
        for m in manifests {
            for f in &m.files {
                for c in &f.chunks {
                    blobs.entry(c.sha256).or_insert_with(|| c.clone());
                }
            }
        }
        BlobIndex {
            blobs: Mutex::new(blobs),
        }
    }

    pub fn get(&self, sha256: &Sha256Digest) -> Option<ChunkRef> {
        self.blobs.lock().unwrap().get(sha256).cloned()
    }

    fn insert(&self, chunk: &ChunkRef) {
        self.blobs
            .lock()
            .unwrap()
            .insert(chunk.sha256, chunk.clone());
    }
}

/// A finished pack, ready to upload.
pub struct SealedPack {
    pub id: String,
    pub data: Bytes,
}

struct OpenPack {
    id: String,
    data: Vec<u8>,
}

/// Appends blobs to the open pack and hands full ones to an uploader through
/// a bounded channel, so memory stays at a few packs whatever the backup size.
pub struct PackWriter {
    open: Mutex<Option<OpenPack>>,
    target_size: usize,
    sealed: mpsc::Sender<SealedPack>,
    index: std::sync::Arc<BlobIndex>,
    id_seed: String,
    counter: std::sync::atomic::AtomicU64,
}

impl PackWriter {
    pub fn new(
        target_size: usize,
        sealed: mpsc::Sender<SealedPack>,
        index: std::sync::Arc<BlobIndex>,
        id_seed: String,
    ) -> PackWriter {
        PackWriter {
            open: Mutex::new(None),
            target_size,
            sealed,
            index,
            id_seed,
            counter: Default::default(),
        }
    }

    /// Pack ids are unique without coordination: a hash of the backup's seed
    /// (id, host, pid, time) and a counter.
    fn next_id(&self) -> String {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Sha256Digest::of(format!("{}/{n}", self.id_seed).as_bytes()).to_hex()[..32].to_string()
    }

    /// Adds one blob (an encoded object) and says where it will live. Blocks
    /// while the uploader is behind: call from a blocking thread.
    pub fn append(&self, sha256: Sha256Digest, size: u64, object: &[u8]) -> Result<ChunkRef> {
        let mut full = None;
        let chunk = {
            let mut guard = self.open.lock().unwrap();
            let pack = guard.get_or_insert_with(|| OpenPack {
                id: self.next_id(),
                data: Vec::with_capacity(self.target_size + (1 << 20)),
            });
            let chunk = ChunkRef {
                sha256,
                size,
                pack: pack.id.clone(),
                offset: pack.data.len() as u64,
                length: object.len() as u64,
            };
            pack.data.extend_from_slice(object);
            if pack.data.len() >= self.target_size {
                full = guard.take();
            }
            chunk
        };
        self.index.insert(&chunk);
        if let Some(pack) = full {
            self.send(pack)?;
        }
        Ok(chunk)
    }

    fn send(&self, pack: OpenPack) -> Result<()> {
        self.sealed
            .blocking_send(SealedPack {
                id: pack.id,
                data: Bytes::from(pack.data),
            })
            .map_err(|_| Error::io("pack uploader stopped (an upload failed)"))
    }

    /// Seals the last, partly filled pack (from async code, after the workers).
    pub async fn finish(&self) -> Result<()> {
        let last = self.open.lock().unwrap().take();
        let Some(pack) = last else { return Ok(()) };
        self.sealed
            .send(SealedPack {
                id: pack.id,
                data: Bytes::from(pack.data),
            })
            .await
            .map_err(|_| Error::io("pack uploader stopped (an upload failed)"))
    }
}
