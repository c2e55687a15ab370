//! `retention.json`: where complete WAL starts, as the last prune left it.
//!
//! `prune --keep-wal-within` trims WAL between older backups on purpose; this
//! record lets verify and status tell such trimming from a lost segment.

use crate::error::{Error, Result};
use crate::repository::Repository;
use serde::{Deserialize, Serialize};

pub const RETENTION_KEY: &str = "retention.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// WAL is complete from this segment on (on its timeline and those that
    /// branch from it); before it, only each backup's start to stop is kept.
    pub complete_from_timeline: u32,
    pub complete_from_segno: u64,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

pub async fn load(repo: &Repository) -> Result<Option<Retention>> {
    let key = object_store::path::Path::from(RETENTION_KEY);
    match repo.get(&key).await? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            Error::corrupt(format!(
                "{RETENTION_KEY} in {} is unreadable: {e}",
                repo.url()
            ))
        }),
    }
}

pub async fn store(repo: &Repository, retention: &Retention) -> Result<()> {
    let key = object_store::path::Path::from(RETENTION_KEY);
    let json = serde_json::to_vec_pretty(retention).expect("serializes");
    repo.put_replace(&key, bytes::Bytes::from(json)).await
}
