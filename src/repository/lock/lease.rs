//! Leases: how a holder (the lock, a backup's marker) shows it is alive, and
//! how another walvault judges it gone (see the module above).

use crate::error::{Error, Result};
use crate::format::key::{Key, lease_key};
use crate::pg::lsn::Lsn;
use crate::repository::Repository;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// How long a holder counts as alive after its last renewal. Long enough to
/// ride out a slow store and modest clock differences between hosts, short
/// enough that a killed prune does not hold up backups for long.
pub const LEASE: Duration = Duration::from_secs(120);
/// How often a holder renews its lease while it works.
pub const RENEW_EVERY: Duration = Duration::from_secs(15);
/// A holder stops doing anything destructive once this much of its lease is
/// left, counted on its own monotonic clock from the start of its last
/// successful renewal: what it plans to delete may be in use by whoever takes
/// over once the lease runs out, and a paused process or a hung store call
/// must not let it act on a plan made before.
pub const LEASE_MARGIN: Duration = Duration::from_secs(60);
/// Those who judge a holder gone wait this much past its recorded expiry:
/// the expiry is on the holder's clock, the judgement on the judge's.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);
/// Takeover claims and orphaned renewals older than this are cleaned up.
pub(super) const RECORDS_KEPT: Duration = Duration::from_secs(3600);

/// Who holds a lock or runs a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub purpose: String,
    pub host: String,
    pub pid: u32,
    pub since: DateTime<Utc>,
    /// Tells our own lock from another process's with the same pid.
    pub token: String,
    /// End of the first lease; renewals extend it. Absent in the format of
    /// older versions, which are judged by pid and age instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expires: Option<DateTime<Utc>>,
}

/// A renewal: the holder with this token is alive until `lease_expires`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Renewal {
    pub(super) token: String,
    pub(super) lease_expires: DateTime<Utc>,
    /// A backup's: where its WAL starts, once PostgreSQL said so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) wal_start: Option<WalStart>,
}

/// Where a backup in progress replays from: prune must keep the WAL from
/// here on, on this timeline, or the backup publishes unrestorable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalStart {
    pub timeline: u32,
    pub lsn: Lsn,
}

/// A backup in progress that is alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveBackup {
    pub holder: Holder,
    /// `None` before pg_backup_start returned (or from older versions).
    pub wal_start: Option<WalStart>,
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into())
}

pub(super) fn lease_end(from: DateTime<Utc>) -> DateTime<Utc> {
    from + chrono::Duration::from_std(LEASE).expect("lease fits")
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
                "{}-{}-{}",
                hostname(),
                std::process::id(),
                since.timestamp_nanos_opt().unwrap_or(0)
            ),
            lease_expires: Some(lease_end(since)),
        }
    }

    /// The old rule, for holders without a lease: stale when it ran on this
    /// host and its process is gone, or ran elsewhere longer ago than
    /// anything walvault does takes.
    pub(super) fn is_stale_by_process(&self, other_host_after: Duration) -> bool {
        if self.host == hostname() {
            !crate::sys::process_exists(self.pid)
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

/// Other hosts' old-format locks older than this are presumed abandoned.
pub(super) const OTHER_HOST_STALE: Duration = Duration::from_secs(48 * 3600);

pub(super) fn parse_holder(repo: &Repository, key: &Key, bytes: &[u8]) -> Result<Holder> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::corrupt(format!(
            "{key} in {} is unreadable ({e}); delete it if no walvault runs",
            repo.url()
        ))
    })
}

pub(super) async fn read_holder_bytes(
    repo: &Repository,
    key: &Key,
) -> Result<Option<(Holder, Bytes)>> {
    Ok(match repo.get(key).await? {
        Some(bytes) => Some((parse_holder(repo, key, &bytes)?, bytes)),
        None => None,
    })
}

pub(super) async fn read_holder(repo: &Repository, key: &Key) -> Result<Option<Holder>> {
    Ok(read_holder_bytes(repo, key).await?.map(|(h, _)| h))
}

/// The holder's last renewal, if it wrote one.
pub(super) async fn renewal(repo: &Repository, holder: &Holder) -> Result<Option<Renewal>> {
    let key = lease_key(&holder.token);
    Ok(match repo.get(&key).await? {
        Some(bytes) => match serde_json::from_slice::<Renewal>(&bytes) {
            Ok(r) if r.token == holder.token => Some(r),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!("{key} in {} is unreadable ({e}); ignoring it", repo.url());
                None
            }
        },
        None => None,
    })
}

/// When the holder's lease ends: the later of its first lease and its last
/// renewal. `None` for a holder of the old format.
pub(super) async fn lease_expiry(
    repo: &Repository,
    holder: &Holder,
) -> Result<Option<DateTime<Utc>>> {
    let Some(first) = holder.lease_expires else {
        return Ok(None);
    };
    let renewed = renewal(repo, holder).await?.map(|r| r.lease_expires);
    Ok(Some(renewed.map_or(first, |r| r.max(first))))
}

/// Whether `holder` may be treated as gone: its lease (as last renewed) ran
/// out, plus an allowance for our clock being ahead of the holder's.
pub(super) async fn is_stale(repo: &Repository, holder: &Holder) -> Result<bool> {
    let skew = chrono::Duration::from_std(CLOCK_SKEW).expect("fits");
    Ok(match lease_expiry(repo, holder).await? {
        Some(expires) => Utc::now() > expires + skew,
        None => holder.is_stale_by_process(OTHER_HOST_STALE),
    })
}

/// How long a judge watches a holder's renewal record, on its own monotonic
/// clock, before acting on a lease that looks expired: a live holder renews
/// every RENEW_EVERY, so a change seen means alive, whatever the clocks say.
#[cfg(not(test))]
pub(super) const WATCH: Duration = Duration::from_secs(2 * RENEW_EVERY.as_secs() + 5);
#[cfg(test)]
pub(super) const WATCH: Duration = Duration::from_millis(300);

/// Whether `holder`, judged stale, is really gone: for a holder with a lease,
/// its renewal record must not change while we watch it (a holder whose
/// clock runs behind ours writes expiries that look past to us, yet renews),
/// and it must still look stale after. Holders of the old format are judged
/// by the old rule alone.
pub(super) async fn confirm_gone(repo: &Repository, holder: &Holder) -> Result<bool> {
    if holder.lease_expires.is_none() {
        return is_stale(repo, holder).await;
    }
    let key = lease_key(&holder.token);
    let before = repo.get(&key).await?;
    tokio::time::sleep(WATCH).await;
    if repo.get(&key).await? != before {
        tracing::info!(
            "{} keeps renewing its lease though its expiry has passed by this host's clock; \
             check that the hosts' clocks agree",
            holder.describe()
        );
        return Ok(false);
    }
    is_stale(repo, holder).await
}

/// A lease we hold on `key` (the repository lock or a backup's marker).
pub struct Lease<'a> {
    pub(super) repo: &'a Repository,
    pub(super) key: Key,
    pub(super) holder: Holder,
    pub(super) renew_every: Duration,
    /// Longest a renewal (check and write) may take before it counts as failed.
    pub(super) renew_timeout: Duration,
    /// Lease length and safety margin (constants; shorter in unit tests).
    pub(super) term: Duration,
    pub(super) margin: Duration,
    /// Past this instant (monotonic clock) we refuse destructive work.
    pub(super) act_until: std::sync::Mutex<Instant>,
    /// A backup's WAL start, carried in every renewal once known.
    pub(super) wal_start: std::sync::Mutex<Option<WalStart>>,
}

impl<'a> Lease<'a> {
    /// `taken_at`: a moment before the holder (and its first lease) was written.
    pub(super) fn new(
        repo: &'a Repository,
        key: Key,
        holder: Holder,
        taken_at: Instant,
    ) -> Lease<'a> {
        Lease {
            repo,
            key,
            holder,
            renew_every: RENEW_EVERY,
            renew_timeout: RENEW_EVERY,
            term: LEASE,
            margin: LEASE_MARGIN,
            act_until: std::sync::Mutex::new(taken_at + LEASE.saturating_sub(LEASE_MARGIN)),
            wal_start: std::sync::Mutex::new(None),
        }
    }

    pub(super) fn act_until(&self) -> Instant {
        *self.act_until.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn renewed(&self, attempt_started: Instant) {
        let until = attempt_started + self.term.saturating_sub(self.margin);
        let mut act_until = self.act_until.lock().unwrap_or_else(|e| e.into_inner());
        *act_until = (*act_until).max(until);
    }

    /// As if the process had stalled past its local deadline.
    #[cfg(test)]
    pub fn expire_now(&self) {
        *self.act_until.lock().unwrap() = Instant::now();
    }

    /// Call right before every destructive step (a delete, publishing a
    /// manifest): refuses once the lease is too close to its end to be sure
    /// nobody else acts on the repository, so a stalled holder never acts on
    /// a stale plan. Synchronous on purpose: no await between it and the step.
    pub fn check(&self, action: &str) -> Result<()> {
        if Instant::now() < self.act_until() {
            return Ok(());
        }
        Err(Error::conflict(format!(
            "{}: refusing to {action}: the lease on {} in {} was not renewed in time, so another              walvault may take over; stopping, run it again",
            self.holder.purpose,
            self.key,
            self.repo.url()
        )))
    }

    /// Whether `key` still holds our holder (nobody judged us gone).
    pub async fn still_ours(&self) -> Result<bool> {
        Ok(read_holder(self.repo, &self.key)
            .await?
            .is_some_and(|h| h.token == self.holder.token))
    }

    /// Records (and renews at once with) where this backup's WAL starts, so
    /// a prune from now on keeps that WAL.
    pub async fn record_wal_start(&self, timeline: u32, lsn: Lsn) -> Result<()> {
        *self.wal_start.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(WalStart { timeline, lsn });
        let attempt_started = Instant::now();
        self.renew().await?;
        self.renewed(attempt_started);
        Ok(())
    }

    pub(super) async fn renew(&self) -> Result<()> {
        let renewal = Renewal {
            token: self.holder.token.clone(),
            lease_expires: lease_end(Utc::now()),
            wal_start: *self.wal_start.lock().unwrap_or_else(|e| e.into_inner()),
        };
        let json = serde_json::to_vec_pretty(&renewal).expect("renewal serializes");
        // Only we write this key, so replacing it cannot undo anyone else's write.
        self.repo
            .put_replace(&lease_key(&self.holder.token), Bytes::from(json))
            .await
    }

    /// Runs `work` while renewing the lease in the background. Fails, ending
    /// `work`, as soon as the lease is found lost (someone judged us gone and
    /// took our place) or could not be renewed before it ran out.
    pub async fn keep_while<T>(
        &self,
        what: &str,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        // Set when `work` is done: the renewal loop stops, but only between
        // attempts, so no renewal lands after the caller deletes the lease's
        // record (a store write dropped midway may still complete).
        let finished = std::sync::atomic::AtomicBool::new(false);
        let wake = tokio::sync::Notify::new();
        let renewing = async {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(self.renew_every) => {}
                    _ = wake.notified() => {}
                }
                if finished.load(std::sync::atomic::Ordering::SeqCst) {
                    return None;
                }
                let attempt_started = Instant::now();
                // A store call may hang for minutes (retries): bounded, so a
                // slow renewal counts as a failed one.
                let attempt = tokio::time::timeout(self.renew_timeout, async {
                    match self.still_ours().await {
                        Ok(true) => self.renew().await.map(|()| true),
                        Ok(false) => Ok(false),
                        Err(e) => Err(e),
                    }
                })
                .await
                .unwrap_or_else(|_| {
                    Err(Error::io(format!(
                        "no answer within {} s",
                        self.renew_timeout.as_secs_f32()
                    )))
                });
                let outcome = match attempt {
                    Ok(true) => Ok(()),
                    Ok(false) => {
                        return Some(Error::conflict(format!(
                            "{what}: another walvault judged this one gone and removed {} from {} \
                             (no lease renewal seen for {} s: was this process stopped?); stopping, \
                             run it again",
                            self.key,
                            self.repo.url(),
                            LEASE.as_secs()
                        )));
                    }
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(()) => self.renewed(attempt_started),
                    Err(e) if Instant::now() < self.act_until() => {
                        tracing::warn!("cannot renew the lease on {}: {e}; retrying", self.key)
                    }
                    Err(e) => {
                        return Some(Error::io(format!(
                            "{what}: cannot renew the lease on {} in time, so others may take it \
                             over ({e}); stopping, run it again",
                            self.key
                        )));
                    }
                }
            }
        };
        let mut renewing = std::pin::pin!(renewing);
        let work = std::pin::pin!(work);
        let done = tokio::select! {
            done = work => done,
            lost = &mut renewing => {
                return Err(lost.unwrap_or_else(|| {
                    Error::io(format!("{what}: the lease on {} stopped being renewed", self.key))
                }));
            }
        };
        finished.store(true, std::sync::atomic::Ordering::SeqCst);
        wake.notify_one();
        let _ = renewing.await;
        done
    }

    /// Removes our renewal record (when we let go of the lease).
    pub(super) async fn forget(&self) {
        if let Err(e) = self.repo.delete(&lease_key(&self.holder.token)).await {
            tracing::debug!("cannot delete the lease record of {}: {e}", self.key);
        }
    }
}
