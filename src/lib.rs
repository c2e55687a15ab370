//! walvault: PostgreSQL WAL archiving and point-in-time recovery.
//!
//! Layers: `main.rs` parses arguments; `commands` holds one module per verb;
//! `repository`, `object` and `wal` are the core they share.

pub mod archive;
pub mod catalog;
pub mod commands;
pub mod duration;
pub mod error;
pub mod lock;
pub mod logging;
pub mod manifest;
pub mod object;
pub mod pack;
pub mod repository;
pub mod retention;
pub mod wal;
