//! The repository lock, and markers for backups in progress.
//!
//! The lock is one create-only object: whoever creates it holds it. prune holds
//! it for its whole run; a backup holds it briefly to register itself at the
//! start and to publish its manifest at the end. So prune either sees a
//! backup's marker (and keeps every pack) or runs wholly before the backup
//! looks at the repository. Stale locks (a dead process on this host) are
//! reported and taken over; anything else held is a clear error.

use crate::error::{Error, Result};
use crate::repository::{Created, Repository};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::path::Path as Key;
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub const LOCK_KEY: &str = "locks/repository.lock.json";
pub const MARKER_PREFIX: &str = "locks/backup-";

/// Who holds a lock or runs a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub purpose: String,
    pub host: String,
    pub pid: u32,
    pub since: DateTime<Utc>,
    /// Tells our own lock from another process's with the same pid.
    pub token: String,
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into())
}

impl Holder {
    pub fn current(purpose: &str) -> Holder {
        let since = Utc::now();
        Holder {
            purpose: purpose.to_string(),
            host: hostname(),
            pid: std::process::id(),
            since,
            token: format!(
                "{}-{}",
                std::process::id(),
                since.timestamp_nanos_opt().unwrap_or(0)
            ),
        }
    }

    /// A holder is stale when it ran on this host and its process is gone, or
    /// ran elsewhere longer ago than anything walvault does takes.
    pub fn is_stale(&self, other_host_after: Duration) -> bool {
        if self.host == hostname() {
            !process_alive(self.pid)
        } else {
            Utc::now()
                .signed_duration_since(self.since)
                .to_std()
                .unwrap_or_default()
                > other_host_after
        }
    }

    pub fn describe(&self) -> String {
        let age = Utc::now()
            .signed_duration_since(self.since)
            .num_seconds()
            .max(0);
        format!(
            "{} on host {} (pid {}) since {} ({age} s ago)",
            self.purpose,
            self.host,
            self.pid,
            self.since.format("%Y-%m-%d %H:%M:%S UTC")
        )
    }
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // Signal 0 checks existence; EPERM means it exists under another user.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Other hosts' locks older than this are presumed abandoned.
const OTHER_HOST_STALE: Duration = Duration::from_secs(48 * 3600);

async fn read_holder(repo: &Repository, key: &Key) -> Result<Option<Holder>> {
    Ok(match repo.get(key).await? {
        Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| {
            Error::corrupt(format!(
                "{key} in {} is unreadable ({e}); delete it if no walvault runs",
                repo.url()
            ))
        })?),
        None => None,
    })
}

pub struct RepoLock<'a> {
    repo: &'a Repository,
    holder: Holder,
}

impl<'a> RepoLock<'a> {
    /// Takes the lock now, or says clearly who has it.
    pub async fn acquire(repo: &'a Repository, purpose: &str) -> Result<RepoLock<'a>> {
        let key = Key::from(LOCK_KEY);
        let holder = Holder::current(purpose);
        let json = Bytes::from(serde_json::to_vec_pretty(&holder).expect("holder serializes"));
        for attempt in 0..2 {
            if repo.put_new(&key, json.clone()).await? == Created::New {
                if attempt > 0 {
                    // Another process may have judged the same stale lock and
                    // deleted ours in between: make sure it is still ours.
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    if read_holder(repo, &key)
                        .await?
                        .is_none_or(|h| h.token != holder.token)
                    {
                        return Err(Error::conflict(format!(
                            "another walvault took over the stale lock of {} at the same time; try again",
                            repo.url()
                        )));
                    }
                }
                return Ok(RepoLock { repo, holder });
            }
            let Some(other) = read_holder(repo, &key).await? else {
                continue;
            };
            if other.is_stale(OTHER_HOST_STALE) {
                tracing::warn!(
                    "removing a stale repository lock held by {}",
                    other.describe()
                );
                repo.delete(&key).await?;
                continue;
            }
            return Err(Error::conflict(format!(
                "repository {} is locked by {}; try again later, or if no walvault runs there, delete {LOCK_KEY}",
                repo.url(),
                other.describe()
            )));
        }
        Err(Error::conflict(format!(
            "repository {} lock keeps changing hands; try again",
            repo.url()
        )))
    }

    /// Waits up to `wait` for the lock (a backup waiting for a prune to end).
    pub async fn acquire_within(
        repo: &'a Repository,
        purpose: &str,
        wait: Duration,
    ) -> Result<RepoLock<'a>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match Self::acquire(repo, purpose).await {
                Err(e)
                    if e.kind == crate::error::ErrorKind::Conflict
                        && tokio::time::Instant::now() < deadline =>
                {
                    tracing::debug!("{e}; waiting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                other => return other,
            }
        }
    }

    /// Releases the lock if it is still ours.
    pub async fn release(self) -> Result<()> {
        let key = Key::from(LOCK_KEY);
        match read_holder(self.repo, &key).await? {
            Some(h) if h.token == self.holder.token => self.repo.delete(&key).await,
            Some(h) => {
                tracing::warn!(
                    "the repository lock was taken over by {} while we held it",
                    h.describe()
                );
                Ok(())
            }
            None => Ok(()),
        }
    }
}

pub fn marker_key(backup_id: &str) -> Key {
    Key::from(format!("{MARKER_PREFIX}{backup_id}.json"))
}

/// Registers a backup in progress (under the lock).
pub async fn write_marker(repo: &Repository, backup_id: &str) -> Result<()> {
    let json = serde_json::to_vec_pretty(&Holder::current(&format!("backup {backup_id}")))
        .expect("serializes");
    match repo
        .put_new(&marker_key(backup_id), Bytes::from(json))
        .await?
    {
        Created::New => Ok(()),
        Created::AlreadyExists => Err(Error::conflict(format!(
            "another backup {backup_id} is starting in {} this very second; try again",
            repo.url()
        ))),
    }
}

/// Backups in progress that are still alive; stale markers are reported and,
/// unless `dry_run`, removed.
pub async fn live_backups(repo: &Repository, dry_run: bool) -> Result<Vec<Holder>> {
    let mut live = vec![];
    for meta in repo.list("locks").await? {
        if !meta.location.as_ref().starts_with(MARKER_PREFIX) {
            continue;
        }
        let Some(holder) = read_holder(repo, &meta.location).await? else {
            continue;
        };
        if holder.is_stale(OTHER_HOST_STALE) {
            tracing::warn!(
                "{} never finished; its uploaded content is garbage now",
                holder.describe()
            );
            if !dry_run {
                repo.delete(&meta.location).await?;
            }
        } else {
            live.push(holder);
        }
    }
    Ok(live)
}
