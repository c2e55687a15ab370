//! Recovery targets: parsing them, choosing the backup that can reach them,
//! and the settings PostgreSQL needs to stop there.

use crate::error::{Error, Result};
use crate::manifest::{Lsn, Manifest};
use crate::retention::Retention;
use chrono::{DateTime, FixedOffset, Utc};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// Replay to the end of the archive.
    Latest,
    Time(DateTime<FixedOffset>),
    Lsn(Lsn),
    Xid(String),
    Name(String),
    /// Stop as soon as the backup is consistent.
    Immediate,
}

/// RFC 3339, or PostgreSQL's `YYYY-MM-DD HH:MM:SS[.ffffff]+ZZ[:MM]`. A time
/// without a zone is refused: guessing one moves a PITR by hours.
pub fn parse_time(s: &str) -> Result<DateTime<FixedOffset>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t);
    }
    // Accept `T` between date and time, and only there.
    let normalized = match s.as_bytes().get(10) {
        Some(b'T') if s.is_char_boundary(10) && s.is_char_boundary(11) => {
            format!("{} {}", &s[..10], &s[11..])
        }
        _ => s.to_string(),
    };
    for format in [
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M:%S%.f %#z",
        "%Y-%m-%d %H:%M:%S%.fZ",
    ] {
        if let Ok(t) = DateTime::parse_from_str(&normalized, format) {
            return Ok(t);
        }
    }
    if normalized.ends_with(" UTC") || normalized.ends_with('Z') {
        let base = normalized.trim_end_matches(" UTC").trim_end_matches('Z');
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(base, "%Y-%m-%d %H:%M:%S%.f") {
            return Ok(t.and_utc().fixed_offset());
        }
    }
    if chrono::NaiveDateTime::parse_from_str(&normalized, "%Y-%m-%d %H:%M:%S%.f").is_ok() {
        return Err(Error::usage(format!(
            "time '{s}' has no time zone; add one, e.g. '{s}+00' for UTC or '{s}+01' for UTC+1"
        )));
    }
    Err(Error::usage(format!(
        "cannot read time '{s}'; use RFC 3339 (2026-11-24T12:00:00Z) or 'YYYY-MM-DD HH:MM:SS+ZZ'"
    )))
}

impl RecoveryTarget {
    /// Picks the backup: the one named, or the newest one that was consistent
    /// before the target (only then can replay stop there).
    /// `retention`: where the archive holds all WAL on each timeline (see
    /// retention.json); xid and name targets cannot be placed in time, so
    /// they start from the oldest backup whose WAL is complete, which reaches
    /// any of them that lies after it.
    pub fn choose<'a>(
        &self,
        backups: &'a [Manifest],
        named: Option<&str>,
        retention: Option<&Retention>,
    ) -> Result<&'a Manifest> {
        if backups.is_empty() {
            return Err(Error::not_found(
                "the repository holds no backup; run 'walvault backup' first",
            ));
        }
        if let Some(id) = named.filter(|id| *id != "latest") {
            let b = backups.iter().find(|b| b.id == id).ok_or_else(|| {
                Error::not_found(format!("no backup {id}; 'walvault list' shows the backups"))
            })?;
            let too_late = match self {
                RecoveryTarget::Time(t) => b.stop_time > t.with_timezone(&Utc),
                RecoveryTarget::Lsn(l) => b.stop_lsn > *l,
                _ => false,
            };
            if too_late {
                return Err(Error::usage(format!(
                    "backup {id} became consistent at {} (LSN {}), after the target; pick an older backup or leave out --backup",
                    b.stop_time.format("%Y-%m-%d %H:%M:%S%.6f+00"),
                    b.stop_lsn
                )));
            }
            return Ok(b);
        }
        if matches!(self, RecoveryTarget::Xid(_) | RecoveryTarget::Name(_)) {
            let size = u64::from(backups[0].wal_segment_size.max(1));
            let complete = |b: &&Manifest| {
                retention.is_none_or(|r| r.is_complete_from(b.timeline, b.start_lsn.0 / size))
            };
            if let Some(b) = backups.iter().find(complete) {
                if backups.len() > 1 {
                    tracing::info!(
                        "starting from backup {}, the oldest with complete WAL after it; give --backup to start from a newer one",
                        b.id
                    );
                }
                return Ok(b);
            }
        }
        let reachable = |b: &&Manifest| match self {
            RecoveryTarget::Time(t) => b.stop_time <= t.with_timezone(&Utc),
            RecoveryTarget::Lsn(l) => b.stop_lsn <= *l,
            _ => true,
        };
        backups.iter().rev().find(reachable).ok_or_else(|| {
            let oldest = &backups[0];
            match self {
                RecoveryTarget::Lsn(l) => Error::usage(format!(
                    "LSN {l} is before every backup; the earliest reachable LSN is {} (backup {})",
                    oldest.stop_lsn, oldest.id
                )),
                _ => Error::usage(format!(
                    "target time is before every backup; the earliest reachable time is {} (backup {})",
                    oldest.stop_time.format("%Y-%m-%d %H:%M:%S%.6f+00"),
                    oldest.id
                )),
            }
        })
    }

    /// postgresql.auto.conf lines naming the target.
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        match self {
            RecoveryTarget::Latest => vec![],
            RecoveryTarget::Time(t) => vec![(
                "recovery_target_time",
                t.with_timezone(&Utc)
                    .format("%Y-%m-%d %H:%M:%S%.6f+00")
                    .to_string(),
            )],
            RecoveryTarget::Lsn(l) => vec![("recovery_target_lsn", l.to_string())],
            RecoveryTarget::Xid(x) => vec![("recovery_target_xid", x.clone())],
            RecoveryTarget::Name(n) => vec![("recovery_target_name", n.clone())],
            RecoveryTarget::Immediate => vec![("recovery_target", "immediate".into())],
        }
    }
}

/// A value in postgresql.conf syntax: single-quoted, quotes doubled.
pub fn conf_quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        let want = DateTime::parse_from_rfc3339("2026-11-24T12:00:00Z").unwrap();
        for ok in [
            "2026-11-24T12:00:00Z",
            "2026-11-24 12:00:00+00",
            "2026-11-24 12:00:00+00:00",
            "2026-11-24 13:00:00+01",
            "2026-11-24 12:00:00 UTC",
            "2026-11-24T13:00:00+01:00",
        ] {
            assert_eq!(parse_time(ok).unwrap(), want, "{ok}");
        }
        assert_eq!(
            parse_time("2026-11-24 12:00:00.250+00")
                .unwrap()
                .timestamp_subsec_millis(),
            250
        );
        let e = parse_time("2026-11-24 12:00:00").unwrap_err();
        assert!(e.message().contains("no time zone"), "{e}");
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(conf_quote("a'b"), "'a''b'");
    }
}
