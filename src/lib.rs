//! walvault: PostgreSQL WAL archiving and point-in-time recovery.
//!
//! Layers, top down (docs/design.md, "Layers", states the rules `make lint`
//! checks): `main.rs` parses arguments straight into each command's options;
//! `commands` holds one module per verb; `ahead` the push-ahead and prefetch
//! workers' spool; `repository` a store plus the cluster binding, catalog,
//! lock and retention; `recovery` which WAL a backup needs and can reach;
//! `store` the storage seam and its drivers; `format` every key and the
//! stored formats; `pg` what walvault knows of PostgreSQL; `sys` every call
//! below std; `human` sizes and durations for people.

/// `println!` that reports a closed or full stdout (`walvault list | head`,
/// `> /dev/full`) as an error instead of panicking.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err(|e| {
            $crate::error::Error::io(format!("cannot write to standard output: {e}"))
        })?
    }};
}

pub mod ahead;
pub mod commands;
pub mod error;
pub mod format;
pub mod human;
pub mod logging;
pub mod pg;
pub mod recovery;
pub mod repository;
pub mod store;
pub mod sys;
