//! walvault: PostgreSQL WAL archiving and point-in-time recovery.
//!
//! Layers: `main.rs` parses arguments; `commands` holds one module per verb;
//! `repository`, `format` and `pg` are the core they share; `store` is
//! the one seam to where objects are kept (a filesystem, S3, or memory).

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
pub mod repository;
pub mod store;
pub mod sys;
