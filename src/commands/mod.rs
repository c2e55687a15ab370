//! One module per command; each takes its options as a plain struct so the
//! CLI layer stays argument parsing only.

pub mod backup;
pub mod check;
pub mod drill;
pub mod fetch;
pub mod list;
pub mod prune;
pub mod push;
pub mod restore;
pub mod status;
pub mod verify;
