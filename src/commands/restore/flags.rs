//! The recovery-target flags restore and drill share, which clap itself turns
//! into a [`RecoveryTarget`].

use super::target::{RecoveryTarget, parse_time};
use crate::pg::lsn::Lsn;
use chrono::{DateTime, FixedOffset};

// The doc comments are the flags' help in `walvault restore --help` and
// `walvault drill --help` (and so this struct has none of its own: clap
// would take it for the command's about).
#[derive(clap::Args)]
#[group(skip)]
struct TargetFlags {
    /// Recover to this time: RFC 3339 or 'YYYY-MM-DD HH:MM:SS+ZZ' (a zone is required).
    #[arg(long, group = "target", value_parser = parse_time)]
    time: Option<DateTime<FixedOffset>>,
    /// Recover to this LSN (e.g. 0/3000060).
    #[arg(long, group = "target", value_parser = str::parse::<Lsn>)]
    lsn: Option<Lsn>,
    /// Recover to this transaction id.
    #[arg(long, group = "target")]
    xid: Option<String>,
    /// Recover to this restore point (pg_create_restore_point).
    #[arg(long, group = "target")]
    name: Option<String>,
    /// Stop as soon as the backup is consistent.
    #[arg(long, group = "target")]
    immediate: bool,
}

impl From<TargetFlags> for RecoveryTarget {
    fn from(f: TargetFlags) -> RecoveryTarget {
        // The "target" group lets at most one of them through.
        if let Some(t) = f.time {
            RecoveryTarget::Time(t)
        } else if let Some(l) = f.lsn {
            RecoveryTarget::Lsn(l)
        } else if let Some(x) = f.xid {
            RecoveryTarget::Xid(x)
        } else if let Some(n) = f.name {
            RecoveryTarget::Name(n)
        } else if f.immediate {
            RecoveryTarget::Immediate
        } else {
            RecoveryTarget::Latest
        }
    }
}

/// `#[command(flatten)] target: RecoveryTarget` adds --time, --lsn, --xid,
/// --name and --immediate, at most one of them (default: the end of the archive).
impl clap::FromArgMatches for RecoveryTarget {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        TargetFlags::from_arg_matches(matches).map(RecoveryTarget::from)
    }
    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = RecoveryTarget::from_arg_matches(matches)?;
        Ok(())
    }
}

impl clap::Args for RecoveryTarget {
    fn group_id() -> Option<clap::Id> {
        TargetFlags::group_id()
    }
    fn augment_args(cmd: clap::Command) -> clap::Command {
        TargetFlags::augment_args(cmd)
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        TargetFlags::augment_args_for_update(cmd)
    }
}
