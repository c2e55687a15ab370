//! Which WAL a backup needs and what the archive lets it reach: the one
//! place status, prune, verify and restore reason about it, so that they
//! agree on what point-in-time recovery can do.
//!
//! Pure: no I/O and no repository. Callers pass plain data in: the archive's
//! segment listing per timeline, manifests, parsed timeline histories.
//!
//! - [`windows`]: from which point to which point the archive lets you
//!   recover, per timeline (status).
//! - [`needs`]: the WAL a backup needs, and what the kept backups need
//!   (prune).
//! - [`continuity`]: the first missing segment, the gaps in a listing, and
//!   the stretches a backup's recovery reads across timeline switches
//!   (status, verify).
//! - [`target`]: which backup can reach a recovery target (restore).
//!
//! Where the commands still differ, on purpose until decided otherwise:
//! - a stop LSN on a segment boundary: status, prune and verify need up to
//!   the byte before it ([`Lsn::segnos_until`]); backup waits for the
//!   segment starting there too ([`Lsn::segnos_through`]).
//! - timelines after a backup's own: status windows stay on its timeline;
//!   verify follows the ones branching at or after its start; prune keeps
//!   every descendant from the need's segment on, and newer timelines of
//!   unknown parentage; restore's lineage takes a backup only when it was
//!   consistent (stop, not start) before the branch.
//! - trimmed WAL: verify and restore's xid/name choice ask retention.json;
//!   status windows simply end at the gap.
//!
//! [`Lsn::segnos_until`]: crate::pg::lsn::Lsn::segnos_until
//! [`Lsn::segnos_through`]: crate::pg::lsn::Lsn::segnos_through

pub mod continuity;
pub mod needs;
pub mod target;
pub mod windows;

use std::collections::BTreeMap;

/// A timeline's parentage: `(parent timeline, LSN where this one branched
/// off)`, nearest parent first, as PostgreSQL's history file lists them
/// reversed.
pub type Ancestry = Vec<(u32, u64)>;

/// The archive's segments: timeline → segment number → whatever the caller
/// keeps of each (a listed file, its archive time, or nothing).
pub type Listing<V> = BTreeMap<u32, BTreeMap<u64, V>>;

/// Whether `timeline` is `ancestor` or branched from it (directly or not),
/// and if so the LSN from which `timeline`'s WAL continues `ancestor`'s
/// (0 for `ancestor` itself). `ancestry`: each timeline's parsed history.
pub fn descends_from(
    ancestry: &BTreeMap<u32, Ancestry>,
    timeline: u32,
    ancestor: u32,
) -> Option<u64> {
    if timeline == ancestor {
        return Some(0);
    }
    ancestry
        .get(&timeline)?
        .iter()
        .find(|(parent, _)| *parent == ancestor)
        .map(|&(_, switch)| switch)
}

#[cfg(test)]
pub(crate) mod testing {
    //! Manifests and listings for the tests of this module.
    use super::Listing;
    use crate::format::manifest::Manifest;
    use crate::pg::lsn::Lsn;
    use chrono::{DateTime, Utc};

    pub const SEG: u32 = 1 << 24;

    /// A backup on `timeline` from `start` to `stop` (LSNs), consistent at
    /// `stop_time`.
    pub fn backup(
        id: &str,
        timeline: u32,
        start: u64,
        stop: u64,
        stop_time: DateTime<Utc>,
    ) -> Manifest {
        Manifest {
            format: 1,
            id: id.into(),
            pg_version: 150000,
            system_identifier: "1".into(),
            wal_segment_size: SEG,
            timeline,
            start_lsn: Lsn(start),
            stop_lsn: Lsn(stop),
            start_time: stop_time - chrono::Duration::minutes(5),
            stop_time,
            backup_label: String::new(),
            tablespace_map: None,
            tablespaces: vec![],
            directories: vec![],
            files: vec![],
            stats: Default::default(),
        }
    }

    /// A listing of `(timeline, segno, value)`.
    pub fn listing<V: Clone>(segments: &[(u32, u64, V)]) -> Listing<V> {
        let mut l = Listing::new();
        for (t, s, v) in segments {
            l.entry(*t).or_default().insert(*s, v.clone());
        }
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descent() {
        let ancestry: BTreeMap<u32, Ancestry> =
            [(2, vec![(1, 0x300)]), (3, vec![(2, 0x500), (1, 0x300)])].into();
        assert_eq!(descends_from(&ancestry, 1, 1), Some(0));
        assert_eq!(descends_from(&ancestry, 2, 1), Some(0x300));
        assert_eq!(descends_from(&ancestry, 3, 2), Some(0x500));
        assert_eq!(descends_from(&ancestry, 3, 1), Some(0x300));
        assert_eq!(descends_from(&ancestry, 1, 2), None);
        // No history file: nothing known.
        assert_eq!(descends_from(&ancestry, 4, 1), None);
    }
}
