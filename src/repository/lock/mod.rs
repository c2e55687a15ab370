//! The repository lock, and markers for backups in progress.
//!
//! The lock is one create-only object: whoever creates it holds it. prune holds
//! it for its whole run; a backup holds it briefly to register itself at the
//! start and to publish its manifest at the end. So prune either sees a
//! backup's marker (and keeps every pack) or runs wholly before the backup
//! looks at the repository.
//!
//! Liveness is a lease, not a process id: pids say nothing across containers,
//! pid namespaces or hosts. Every holder (the lock, a backup's marker) records
//! when its lease ends and, while it works, renews it in an object of its own
//! (`locks/lease-<hash of its token>.json`, which nobody else writes). Another
//! walvault may judge a holder gone only once its lease has run out with no
//! renewal seen, and only after watching the renewal object stay unchanged on
//! its own clock: expiries are written by the holder's clock, judged by
//! another's. Locks and markers written by older versions (no lease) are
//! judged by the old rule: a dead pid on this host, or two days from another.
//!
//! Taking over a stale lock is conditional: the taker first creates a
//! create-only claim named after the exact bytes it judged stale, so of several
//! walvaults judging the same lock only one removes it, and it removes it only
//! if those bytes are still what the lock holds.

mod lease;

pub use lease::*;

use crate::error::{Error, Result};
use crate::format::key::{
    Key, LEASE_PREFIX, LOCK_KEY, LOCKS_DIR, MARKER_PREFIX, TAKEOVER_PREFIX, lease_key, marker_key,
    takeover_key,
};
use crate::repository::{Created, Repository};
use bytes::Bytes;
use chrono::Utc;
use std::time::{Duration, Instant};

/// Why the lock could not be taken now.
enum Attempt<'a> {
    Taken(RepoLock<'a>),
    Held(Holder),
}

pub struct RepoLock<'a> {
    lease: Lease<'a>,
}

impl<'a> RepoLock<'a> {
    /// Takes the lock now, or says clearly who has it.
    pub async fn acquire(repo: &'a Repository, purpose: &str) -> Result<RepoLock<'a>> {
        match Self::attempt(repo, purpose).await? {
            Attempt::Taken(lock) => Ok(lock),
            Attempt::Held(other) => Err(held_error(repo, &other)),
        }
    }

    async fn attempt(repo: &'a Repository, purpose: &str) -> Result<Attempt<'a>> {
        let key = Key::from(LOCK_KEY);
        // Before the holder's clock starts: our local deadline never trails it.
        let taken_at = Instant::now();
        let holder = Holder::current(purpose);
        let json = Bytes::from(serde_json::to_vec_pretty(&holder).expect("holder serializes"));
        let mut took_over = false;
        for _ in 0..3 {
            if repo.put_new(&key, json.clone()).await? == Created::New {
                let lock = RepoLock {
                    lease: Lease::new(repo, key.clone(), holder, taken_at),
                };
                if took_over {
                    // Another process may have judged the same stale lock and
                    // deleted ours in between: make sure it is still ours.
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    if !lock.lease.still_ours().await? {
                        return Err(Error::conflict(format!(
                            "another walvault took over the stale lock of {} at the same time; try again",
                            repo.url()
                        )));
                    }
                }
                clean_old_records(repo).await;
                return Ok(Attempt::Taken(lock));
            }
            let Some((other, judged)) = read_holder_bytes(repo, &key).await? else {
                continue;
            };
            if !is_stale(repo, &other).await? || !confirm_gone(repo, &other).await? {
                return Ok(Attempt::Held(other));
            }
            // Claim the right to remove exactly what we judged stale: of
            // several walvaults judging it, one claim is created.
            let claim = takeover_key(&judged);
            if repo.put_new(&claim, json.clone()).await? == Created::AlreadyExists {
                let claimed_by = read_holder(repo, &claim).await.ok().flatten();
                let claim_is_recent = claimed_by.as_ref().is_none_or(|c| {
                    Utc::now()
                        .signed_duration_since(c.since)
                        .to_std()
                        .unwrap_or_default()
                        < LEASE
                });
                if claim_is_recent {
                    // Being taken over right now: held, for the moment.
                    return Ok(Attempt::Held(other));
                }
                // The claimant died before finishing; its claim counts no more.
            }
            match repo.get(&key).await? {
                // Re-read the renewal right before removing: it may have
                // come in while we claimed.
                Some(now) if now == judged && is_stale(repo, &other).await? => {
                    tracing::warn!(
                        "removing a stale repository lock held by {}",
                        other.describe()
                    );
                    repo.delete(&key).await?;
                    let _ = repo.delete(&lease_key(&other.token)).await;
                }
                // Released, replaced or renewed: not ours to remove.
                _ => {}
            }
            took_over = true;
        }
        Err(Error::conflict(format!(
            "repository {} lock keeps changing hands; try again",
            repo.url()
        )))
    }

    /// Waits up to `wait` for the lock (a backup waiting for a prune to end).
    /// With `while_holder_renews`, waits on beyond `wait` as long as the
    /// holder keeps renewing its lease (it is alive and working), up to a day:
    /// a finished backup should not be lost to a long prune.
    pub async fn acquire_within(
        repo: &'a Repository,
        purpose: &str,
        wait: Duration,
        while_holder_renews: bool,
    ) -> Result<RepoLock<'a>> {
        const HARD_LIMIT: Duration = Duration::from_secs(24 * 3600);
        let started = tokio::time::Instant::now();
        let mut last_said = started;
        loop {
            let other = match Self::attempt(repo, purpose).await {
                Ok(Attempt::Taken(lock)) => return Ok(lock),
                Ok(Attempt::Held(other)) => other,
                Err(e) if e.kind == crate::error::ErrorKind::Conflict => {
                    if started.elapsed() >= wait {
                        return Err(e);
                    }
                    tracing::debug!("{e}; waiting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let elapsed = started.elapsed();
            let keep_waiting = elapsed < wait
                || (while_holder_renews && other.lease_expires.is_some() && elapsed < HARD_LIMIT);
            if !keep_waiting {
                return Err(held_error(repo, &other));
            }
            if last_said.elapsed() >= Duration::from_secs(60) {
                tracing::info!(
                    "waiting for the repository lock held by {}",
                    other.describe()
                );
                last_said = tokio::time::Instant::now();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The lock's lease, to [`Lease::check`] before each destructive step.
    pub fn lease(&self) -> &Lease<'a> {
        &self.lease
    }

    /// Runs `work` holding the lock, renewing its lease meanwhile.
    pub async fn hold<T>(&self, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let what = self.lease.holder.purpose.clone();
        self.lease.keep_while(&what, work).await
    }

    /// Releases the lock if it is still ours.
    pub async fn release(self) -> Result<()> {
        let repo = self.lease.repo;
        let key = Key::from(LOCK_KEY);
        let result = match read_holder(repo, &key).await? {
            Some(h) if h.token == self.lease.holder.token => repo.delete(&key).await,
            Some(h) => {
                tracing::warn!(
                    "the repository lock was taken over by {} while we held it",
                    h.describe()
                );
                Ok(())
            }
            None => Ok(()),
        };
        self.lease.forget().await;
        result
    }
}

fn held_error(repo: &Repository, other: &Holder) -> Error {
    let rule = if other.lease_expires.is_some() {
        format!(
            "it is taken over once not renewed for {} s",
            LEASE.as_secs()
        )
    } else {
        format!("if no walvault runs there, delete {LOCK_KEY}")
    };
    Error::conflict(format!(
        "repository {} is locked by {}; try again later ({rule})",
        repo.url(),
        other.describe()
    ))
}

/// Deletes takeover claims and renewals of vanished holders once they are old:
/// housekeeping, so failures only get a debug line.
async fn clean_old_records(repo: &Repository) {
    let Ok(listed) = repo.list(LOCKS_DIR).await else {
        return;
    };
    let cutoff = Utc::now() - chrono::Duration::from_std(RECORDS_KEPT).expect("fits");
    for meta in listed {
        let name = meta.key.as_ref();
        let old = if name.starts_with(TAKEOVER_PREFIX) {
            meta.last_modified < cutoff
        } else if name.starts_with(LEASE_PREFIX) {
            match repo.get(&meta.key).await {
                Ok(Some(bytes)) => serde_json::from_slice::<Renewal>(&bytes)
                    .map_or(meta.last_modified < cutoff, |r| r.lease_expires < cutoff),
                _ => false,
            }
        } else {
            false
        };
        if old && let Err(e) = repo.delete(&meta.key).await {
            tracing::debug!("cannot clean up {}: {e}", meta.key);
        }
    }
}

/// Registers a backup in progress (under the lock). The backup keeps the
/// returned lease renewed while it runs ([`Lease::keep_while`]).
pub async fn write_marker<'a>(repo: &'a Repository, backup_id: &str) -> Result<Lease<'a>> {
    let taken_at = Instant::now();
    let holder = Holder::current(&format!("backup {backup_id}"));
    let json = serde_json::to_vec_pretty(&holder).expect("serializes");
    let key = marker_key(backup_id);
    match repo.put_new(&key, Bytes::from(json)).await? {
        Created::New => Ok(Lease::new(repo, key, holder, taken_at)),
        Created::AlreadyExists => Err(Error::conflict(format!(
            "another backup {backup_id} is starting in {} this very second; try again",
            repo.url()
        ))),
    }
}

/// Unregisters a finished (or failed) backup.
pub async fn remove_marker(marker: Lease<'_>) -> Result<()> {
    let result = marker.repo.delete(&marker.key).await;
    marker.forget().await;
    result
}

/// Backups in progress that are still alive; stale markers are reported and,
/// unless `dry_run`, removed.
pub async fn live_backups(repo: &Repository, dry_run: bool) -> Result<Vec<LiveBackup>> {
    let mut live = vec![];
    for meta in repo.list(LOCKS_DIR).await? {
        if !meta.key.as_ref().starts_with(MARKER_PREFIX) {
            continue;
        }
        let Some(holder) = read_holder(repo, &meta.key).await? else {
            continue;
        };
        if is_stale(repo, &holder).await? && (dry_run || confirm_gone(repo, &holder).await?) {
            tracing::warn!(
                "{} never finished; its uploaded content is garbage now",
                holder.describe()
            );
            if !dry_run {
                repo.delete(&meta.key).await?;
                let _ = repo.delete(&lease_key(&holder.token)).await;
            }
        } else {
            let wal_start = renewal(repo, &holder).await?.and_then(|r| r.wal_start);
            live.push(LiveBackup { holder, wal_start });
        }
    }
    Ok(live)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::lsn::Lsn;
    use crate::repository::RepoUrl;

    fn repo(dir: &std::path::Path) -> Repository {
        Repository::open(&RepoUrl::Local(dir.to_path_buf()), true).unwrap()
    }

    /// A holder as another walvault (another host, or a pid namespace where
    /// its pid means nothing here) wrote it.
    fn foreign(purpose: &str, lease_left_secs: i64) -> Holder {
        let since = Utc::now() - chrono::Duration::seconds(300);
        Holder {
            purpose: purpose.into(),
            host: hostname(),
            // No such process here: the old rule would call this holder dead.
            pid: 4_000_000,
            since,
            token: format!("foreign-{purpose}-{lease_left_secs}"),
            lease_expires: Some(Utc::now() + chrono::Duration::seconds(lease_left_secs)),
        }
    }

    async fn plant(repo: &Repository, key: &str, holder: &Holder) -> Bytes {
        let bytes = Bytes::from(serde_json::to_vec(holder).unwrap());
        repo.put_replace(&Key::from(key), bytes.clone())
            .await
            .unwrap();
        bytes
    }

    async fn stored(repo: &Repository, key: &str) -> Option<Bytes> {
        repo.get(&Key::from(key)).await.unwrap()
    }

    #[tokio::test]
    async fn a_fresh_lease_is_not_taken_over_even_if_its_pid_is_gone_here() {
        let d = tempfile::tempdir().unwrap();
        let repo = repo(d.path());
        let planted = plant(&repo, LOCK_KEY, &foreign("prune", 60)).await;
        let err = RepoLock::acquire(&repo, "prune").await.err().unwrap();
        assert_eq!(err.kind, crate::error::ErrorKind::Conflict);
        assert!(err.message().contains("is locked by prune"), "{err}");
        assert_eq!(stored(&repo, LOCK_KEY).await, Some(planted));
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over() {
        let d = tempfile::tempdir().unwrap();
        let repo = repo(d.path());
        // A prune killed on an ephemeral host, gone with it: its lease ran
        // out a second ago (the old rule would wait two days for another host).
        let mut killed = foreign("prune", -(CLOCK_SKEW.as_secs() as i64) - 1);
        killed.host = "ephemeral-pod-7f9c".into();
        plant(&repo, LOCK_KEY, &killed).await;
        let lock = RepoLock::acquire_within(&repo, "backup x finish", Duration::ZERO, true)
            .await
            .unwrap();
        assert!(lock.lease.still_ours().await.unwrap());
        lock.release().await.unwrap();
        assert_eq!(stored(&repo, LOCK_KEY).await, None);
    }

    #[tokio::test]
    async fn a_lease_just_past_its_expiry_is_not_taken_over_within_the_clock_skew() {
        let d = tempfile::tempdir().unwrap();
        let repo = repo(d.path());
        // Expired five seconds ago by our clock, which may run ahead of the
        // holder's: not yet ours to judge.
        let planted = plant(&repo, LOCK_KEY, &foreign("prune", -5)).await;
        let err = RepoLock::acquire(&repo, "prune").await.err().unwrap();
        assert!(err.message().contains("is locked by prune"), "{err}");
        assert_eq!(stored(&repo, LOCK_KEY).await, Some(planted));
    }

    #[tokio::test]
    async fn a_holder_whose_clock_runs_behind_but_renews_is_not_taken_over() {
        let d = tempfile::tempdir().unwrap();
        let repo = repo(d.path());
        // Its clock is ten minutes behind ours: every expiry it writes looks
        // long past here, yet it renews as it should.
        let holder = foreign("prune", -600);
        let planted = plant(&repo, LOCK_KEY, &holder).await;
        let renewing = async {
            for _ in 0..20 {
                let r = Renewal {
                    token: holder.token.clone(),
                    lease_expires: Utc::now() - chrono::Duration::seconds(600),
                    wal_start: None,
                };
                repo.put_replace(&lease_key(&holder.token), serde_json::to_vec(&r).unwrap())
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let (taken, ()) = tokio::join!(RepoLock::acquire(&repo, "prune"), renewing);
        let err = taken.err().unwrap();
        assert!(err.message().contains("is locked by prune"), "{err}");
        assert_eq!(stored(&repo, LOCK_KEY).await, Some(planted));
    }

    /// A lease as a unit test wants it: short, and renewed only if asked.
    fn short(mut lease: Lease<'_>, term_ms: u64, renew_every_ms: u64) -> Lease<'_> {
        lease.term = Duration::from_millis(term_ms);
        lease.margin = Duration::from_millis(term_ms / 2);
        lease.renew_every = Duration::from_millis(renew_every_ms);
        *lease.act_until.lock().unwrap() = Instant::now() + lease.term - lease.margin;
        lease
    }

    #[tokio::test]
    async fn a_holder_past_its_local_deadline_refuses_destructive_work() {
        let d = tempfile::tempdir().unwrap();
        let repo = repo(d.path());
        // Its renewal is far off (a paused process, a hung store call).
        let marker = short(
            write_marker(&repo, "0000000000000003").await.unwrap(),
            200,
            60_000,
        );
        marker.check("publish backup 3").unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let err = marker.check("publish backup 3").err().unwrap();
        assert_eq!(err.kind, crate::error::ErrorKind::Conflict);
        assert!(
            err.message().contains("refusing to publish backup 3"),
            "{err}"
        );
        // A successful renewal moves the deadline on.
        let renewing = short(marker, 200, 20);
        let r = renewing
            .keep_while("backup", async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                renewing.check("publish backup 3")
            })
            .await;
        r.unwrap();
    }

    #[tokio::test]
    async fn renewals_that_do_not_answer_in_time_end_the_work_at_the_local_deadline() {
        let d = tempfile::tempdir().unwrap();
        let repo = repo(d.path());
        let mut lock = RepoLock::acquire(&repo, "prune").await.unwrap();
        lock.lease = short(lock.lease, 300, 20);
        // Every renewal "hangs": none answers within its time limit.
        lock.lease.renew_timeout = Duration::ZERO;
        let started = Instant::now();
        let err = lock
            .hold(async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(())
            })
            .await
            .err()
            .unwrap();
        assert!(err.message().contains("cannot renew the lease"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        lock.release().await.unwrap();
    }

    #[tokio::test]
    async fn a_finished_backup_waits_for_a_prune_that_keeps_renewing() {
        let d = tempfile::tempdir().unwrap();
        let repo = repo(d.path());
        let prune = RepoLock::acquire(&repo, "prune").await.unwrap();
        // Without following a live holder, the wait is the limit.
        let err = RepoLock::acquire_within(&repo, "backup x start", Duration::ZERO, false)
            .await
            .err()
            .unwrap();
        assert!(err.message().contains("is locked by prune"), "{err}");
        // A finished backup waits past its limit while prune works and renews.
        let finishing = async {
            RepoLock::acquire_within(&repo, "backup x finish", Duration::ZERO, true)
                .await
                .unwrap()
        };
        let pruning = async {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            prune.release().await.unwrap();
        };
        let (lock, ()) = tokio::join!(finishing, pruning);
        assert!(lock.lease.still_ours().await.unwrap());
        lock.release().await.unwrap();
    }

    #[tokio::test]
    async fn a_renewed_lease_is_not_taken_over() {
        let d = tempfile::tempdir().unwrap();
        let repo = repo(d.path());
        // The first lease ran out, but the holder renewed it since.
        let holder = foreign("prune", -30);
        let planted = plant(&repo, LOCK_KEY, &holder).await;
        Lease::new(&repo, Key::from(LOCK_KEY), holder, Instant::now())
            .renew()
            .await
            .unwrap();
        assert!(RepoLock::acquire(&repo, "prune").await.is_err());
        assert_eq!(stored(&repo, LOCK_KEY).await, Some(planted));
    }

    #[tokio::test]
    async fn a_takeover_claimed_by_another_walvault_is_left_to_it() {
        let d = tempfile::tempdir().unwrap();
        let repo = repo(d.path());
        let planted = plant(
            &repo,
            LOCK_KEY,
            &foreign("prune", -(CLOCK_SKEW.as_secs() as i64) - 1),
        )
        .await;
        // Another walvault has just claimed this very lock.
        let claimer = Holder::current("prune elsewhere");
        repo.put_new(
            &takeover_key(&planted),
            Bytes::from(serde_json::to_vec(&claimer).unwrap()),
        )
        .await
        .unwrap();
        assert!(RepoLock::acquire(&repo, "prune").await.is_err());
        assert_eq!(stored(&repo, LOCK_KEY).await, Some(planted));
    }

    #[tokio::test]
    async fn old_format_locks_keep_the_old_rule() {
        let d = tempfile::tempdir().unwrap();
        let repo = repo(d.path());
        let mut old = foreign("prune", 0);
        old.lease_expires = None;
        // Another host, five minutes old: held (two days is the old limit).
        old.host = "elsewhere".into();
        let planted = plant(&repo, LOCK_KEY, &old).await;
        let text = String::from_utf8(planted.to_vec()).unwrap();
        assert!(!text.contains("lease"), "{text}");
        assert!(RepoLock::acquire(&repo, "prune").await.is_err());
        // This host, process gone: stale.
        old.host = hostname();
        plant(&repo, LOCK_KEY, &old).await;
        RepoLock::acquire(&repo, "prune")
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn markers_live_by_lease() {
        let d = tempfile::tempdir().unwrap();
        let repo = repo(d.path());
        let running = foreign("backup 1", 60);
        let dead = foreign("backup 2", -(CLOCK_SKEW.as_secs() as i64) - 1);
        plant(&repo, "locks/backup-1.json", &running).await;
        plant(&repo, "locks/backup-2.json", &dead).await;
        let live = live_backups(&repo, false).await.unwrap();
        assert_eq!(
            live,
            vec![LiveBackup {
                holder: running,
                wal_start: None
            }]
        );
        assert!(stored(&repo, "locks/backup-1.json").await.is_some());
        assert!(stored(&repo, "locks/backup-2.json").await.is_none());
    }

    #[tokio::test]
    async fn a_backup_in_progress_says_where_its_wal_starts() {
        let d = tempfile::tempdir().unwrap();
        let repo = repo(d.path());
        let marker = write_marker(&repo, "0000000000000004").await.unwrap();
        let live = live_backups(&repo, true).await.unwrap();
        assert_eq!(live[0].wal_start, None);
        marker.record_wal_start(2, Lsn(0x0600_0028)).await.unwrap();
        let live = live_backups(&repo, true).await.unwrap();
        assert_eq!(
            live[0].wal_start,
            Some(WalStart {
                timeline: 2,
                lsn: Lsn(0x0600_0028)
            })
        );
        remove_marker(marker).await.unwrap();
    }

    #[tokio::test]
    async fn a_lost_lease_stops_the_work() {
        let d = tempfile::tempdir().unwrap();
        let repo = repo(d.path());
        let mut marker = write_marker(&repo, "0000000000000001").await.unwrap();
        marker.renew_every = Duration::from_millis(20);
        // Someone judged this backup gone and removed its marker.
        repo.delete(&marker_key("0000000000000001")).await.unwrap();
        let err = marker
            .keep_while("backup", async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(())
            })
            .await
            .err()
            .unwrap();
        assert!(err.message().contains("judged this one gone"), "{err}");
    }

    #[tokio::test]
    async fn a_held_lease_is_renewed_while_working() {
        let d = tempfile::tempdir().unwrap();
        let repo = repo(d.path());
        let mut marker = write_marker(&repo, "0000000000000002").await.unwrap();
        marker.renew_every = Duration::from_millis(20);
        let token = marker.holder.token.clone();
        marker
            .keep_while("backup", async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(())
            })
            .await
            .unwrap();
        let renewal: Renewal =
            serde_json::from_slice(&repo.get(&lease_key(&token)).await.unwrap().unwrap()).unwrap();
        assert!(renewal.lease_expires > marker.holder.lease_expires.unwrap());
        remove_marker(marker).await.unwrap();
        assert!(repo.get(&lease_key(&token)).await.unwrap().is_none());
    }

    // In process, over the memory store: two Repository handles on one
    // store are two hosts seeing the same objects.

    fn two_hosts() -> (Repository, Repository) {
        let url = RepoUrl::S3 {
            bucket: "shared".into(),
            prefix: String::new(),
        };
        let store: std::sync::Arc<dyn crate::store::Store> =
            std::sync::Arc::new(crate::store::memory::MemoryStore::named(&url));
        (
            Repository::with_store(store.clone(), url.clone()),
            Repository::with_store(store, url),
        )
    }

    fn long_expired(purpose: &str) -> Holder {
        foreign(purpose, -(CLOCK_SKEW.as_secs() as i64) - 1)
    }

    async fn takeover_claims(repo: &Repository) -> usize {
        repo.list(LOCKS_DIR)
            .await
            .unwrap()
            .iter()
            .filter(|m| m.key.as_ref().starts_with(TAKEOVER_PREFIX))
            .count()
    }

    #[tokio::test]
    async fn in_memory_a_fresh_lease_is_kept_and_an_expired_one_taken_over() {
        let repo = Repository::in_memory();
        let planted = plant(&repo, LOCK_KEY, &foreign("prune", 60)).await;
        let err = RepoLock::acquire(&repo, "prune").await.err().unwrap();
        assert_eq!(err.kind, crate::error::ErrorKind::Conflict);
        assert!(err.message().contains("is locked by prune"), "{err}");
        assert_eq!(stored(&repo, LOCK_KEY).await, Some(planted));
        assert_eq!(takeover_claims(&repo).await, 0);

        let killed = long_expired("prune");
        let judged = plant(&repo, LOCK_KEY, &killed).await;
        let lock = RepoLock::acquire(&repo, "backup x finish").await.unwrap();
        assert!(lock.lease.still_ours().await.unwrap());
        let now: Holder = serde_json::from_slice(&stored(&repo, LOCK_KEY).await.unwrap()).unwrap();
        assert_eq!(now.token, lock.lease.holder.token);
        // The takeover was claimed under the bytes judged stale.
        assert!(
            stored(&repo, takeover_key(&judged).as_str())
                .await
                .is_some()
        );
        lock.release().await.unwrap();
        assert_eq!(stored(&repo, LOCK_KEY).await, None);
    }

    #[tokio::test]
    async fn a_lock_expired_on_another_host_is_taken_over_by_this_one() {
        let (there, here) = two_hosts();
        let mut killed = long_expired("prune");
        killed.host = "ephemeral-pod-7f9c".into();
        plant(&there, LOCK_KEY, &killed).await;
        // Its renewal record, left behind, is removed with the lock.
        let last = Renewal {
            token: killed.token.clone(),
            lease_expires: killed.lease_expires.unwrap(),
            wal_start: None,
        };
        there
            .put_replace(
                &lease_key(&killed.token),
                Bytes::from(serde_json::to_vec(&last).unwrap()),
            )
            .await
            .unwrap();
        let lock = RepoLock::acquire(&here, "prune").await.unwrap();
        assert!(
            stored(&there, lease_key(&killed.token).as_str())
                .await
                .is_none()
        );
        let seen_there: Holder =
            serde_json::from_slice(&stored(&there, LOCK_KEY).await.unwrap()).unwrap();
        assert_eq!(seen_there.token, lock.lease.holder.token);
        lock.release().await.unwrap();
        assert_eq!(stored(&there, LOCK_KEY).await, None);
    }

    #[tokio::test]
    async fn two_judges_racing_over_one_stale_lock_one_takes_it_over() {
        let (a, b) = two_hosts();
        let judged = plant(&a, LOCK_KEY, &long_expired("prune")).await;
        let (got_a, got_b) = tokio::join!(
            RepoLock::acquire(&a, "prune on a"),
            RepoLock::acquire(&b, "prune on b")
        );
        let (winner, loser) = match (got_a, got_b) {
            (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
            (Ok(_), Ok(_)) => panic!("both judges took the lock over"),
            (Err(x), Err(y)) => panic!("neither judge took the lock over: {x}; {y}"),
        };
        assert_eq!(loser.kind, crate::error::ErrorKind::Conflict, "{loser}");
        // One claim, named after what both judged stale.
        assert_eq!(takeover_claims(&a).await, 1);
        assert!(stored(&a, takeover_key(&judged).as_str()).await.is_some());
        assert!(winner.lease.still_ours().await.unwrap());
        let now: Holder = serde_json::from_slice(&stored(&b, LOCK_KEY).await.unwrap()).unwrap();
        assert_eq!(now.token, winner.lease.holder.token);
        winner.release().await.unwrap();
        assert_eq!(stored(&a, LOCK_KEY).await, None);
    }

    #[tokio::test]
    async fn the_judge_that_loses_the_race_waits_for_the_winner() {
        let (a, b) = two_hosts();
        plant(&a, LOCK_KEY, &long_expired("prune")).await;
        // Each holds the lock for a while once it has it, and notes when.
        async fn take(repo: &Repository, purpose: &str) -> (Instant, Instant) {
            let lock = RepoLock::acquire_within(repo, purpose, Duration::from_secs(10), false)
                .await
                .unwrap();
            let from = Instant::now();
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert!(lock.lease.still_ours().await.unwrap(), "{purpose}");
            let to = Instant::now();
            lock.release().await.unwrap();
            (from, to)
        }
        let (held_a, held_b) = tokio::join!(take(&a, "prune on a"), take(&b, "prune on b"));
        let (first, second) = if held_a.0 <= held_b.0 {
            (held_a, held_b)
        } else {
            (held_b, held_a)
        };
        assert!(first.1 <= second.0, "both held the lock at once");
        assert_eq!(takeover_claims(&a).await, 1);
        assert_eq!(stored(&a, LOCK_KEY).await, None);
    }

    #[tokio::test]
    async fn a_holder_whose_lock_another_host_took_over_stops_and_leaves_it() {
        let (here, there) = two_hosts();
        let mut prune = RepoLock::acquire(&here, "prune").await.unwrap();
        prune.lease.renew_every = Duration::from_millis(20);
        // The other host judged this prune gone (it was stopped past its
        // lease) and took its place.
        there.delete(&Key::from(LOCK_KEY)).await.unwrap();
        let taker = RepoLock::acquire(&there, "backup x finish").await.unwrap();
        let err = prune
            .hold(async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(())
            })
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind, crate::error::ErrorKind::Conflict);
        assert!(err.message().contains("judged this one gone"), "{err}");
        // Letting go removes nothing of the new holder's.
        prune.release().await.unwrap();
        assert!(taker.lease.still_ours().await.unwrap());
        taker.release().await.unwrap();
        assert_eq!(stored(&here, LOCK_KEY).await, None);
    }

    #[tokio::test]
    async fn another_host_sees_a_running_backup_and_where_its_wal_starts() {
        let (backup_host, prune_host) = two_hosts();
        let marker = write_marker(&backup_host, "0000000000000005")
            .await
            .unwrap();
        marker.record_wal_start(2, Lsn(0x0600_0028)).await.unwrap();
        plant(
            &backup_host,
            "locks/backup-0000000000000006.json",
            &long_expired("backup 6"),
        )
        .await;
        let live = live_backups(&prune_host, false).await.unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].holder, marker.holder);
        assert_eq!(
            live[0].wal_start,
            Some(WalStart {
                timeline: 2,
                lsn: Lsn(0x0600_0028)
            })
        );
        // The dead one is gone for both.
        assert!(
            stored(&backup_host, "locks/backup-0000000000000006.json")
                .await
                .is_none()
        );
        remove_marker(marker).await.unwrap();
        assert!(live_backups(&prune_host, true).await.unwrap().is_empty());
    }
}
