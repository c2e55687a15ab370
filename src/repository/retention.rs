//! `retention.json`: where complete WAL starts, as the last prune left it.
//!
//! `prune --keep-wal-within` trims WAL between older backups on purpose; this
//! record lets verify and status tell such trimming from a lost segment.

use crate::error::{Error, Result};
use crate::format::key::RETENTION_KEY;
use crate::repository::Repository;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// WAL is complete from this segment on (on its timeline and those that
    /// branch from it); before it, only each backup's start to stop is kept.
    /// Kept for readers of the first format: the first entry of `timelines`.
    pub complete_from_timeline: u32,
    pub complete_from_segno: u64,
    pub updated_at: chrono::DateTime<chrono::Utc>,
    /// The same, per timeline that held a kept backup. Absent in records
    /// written before timelines were recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timelines: Vec<TimelineRetention>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineRetention {
    pub timeline: u32,
    pub complete_from_segno: u64,
}

impl Retention {
    /// A record for the per-timeline starts of complete WAL (none: no record).
    pub fn new(
        timelines: Vec<TimelineRetention>,
        updated_at: chrono::DateTime<chrono::Utc>,
    ) -> Option<Retention> {
        let first = timelines.first()?.clone();
        Some(Retention {
            complete_from_timeline: first.timeline,
            complete_from_segno: first.complete_from_segno,
            updated_at,
            timelines,
        })
    }

    /// Whether the last prune left all WAL on `timeline` from `segno` on.
    /// A timeline the record does not name held no kept backup then, so
    /// nothing on it was trimmed on purpose. A record of the first format
    /// names one timeline only, and says nothing about the others.
    pub fn is_complete_from(&self, timeline: u32, segno: u64) -> bool {
        if self.timelines.is_empty() {
            return timeline != self.complete_from_timeline || segno >= self.complete_from_segno;
        }
        self.timelines
            .iter()
            .find(|t| t.timeline == timeline)
            .is_none_or(|t| segno >= t.complete_from_segno)
    }
}

pub async fn load(repo: &Repository) -> Result<Option<Retention>> {
    let key = crate::format::key::Key::from(RETENTION_KEY);
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
    let key = crate::format::key::Key::from(RETENTION_KEY);
    let json = serde_json::to_vec_pretty(retention).expect("serializes");
    repo.put_replace(&key, bytes::Bytes::from(json)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_records_still_read() {
        let old = r#"{"complete_from_timeline": 1, "complete_from_segno": 20,
                     "updated_at": "2026-11-27T15:34:44Z"}"#;
        let r: Retention = serde_json::from_str(old).unwrap();
        assert!(r.timelines.is_empty());
        assert!(!r.is_complete_from(1, 19));
        assert!(r.is_complete_from(1, 20));
        // The first format said nothing of timeline 2: nothing is excused there.
        assert!(r.is_complete_from(2, 3));
    }

    #[test]
    fn per_timeline() {
        let r = Retention::new(
            vec![
                TimelineRetention {
                    timeline: 1,
                    complete_from_segno: 20,
                },
                TimelineRetention {
                    timeline: 2,
                    complete_from_segno: 5,
                },
            ],
            chrono::Utc::now(),
        )
        .unwrap();
        assert_eq!((r.complete_from_timeline, r.complete_from_segno), (1, 20));
        assert!(!r.is_complete_from(1, 5));
        assert!(r.is_complete_from(2, 5));
        assert!(!r.is_complete_from(2, 4));
        assert!(r.is_complete_from(3, 0));
        let json = serde_json::to_string(&r).unwrap();
        let back: Retention = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        assert!(Retention::new(vec![], chrono::Utc::now()).is_none());
    }
}
