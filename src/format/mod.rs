//! The repository format (docs/format.md) in one place: every key, the
//! object codec, backup manifests and packs.

pub mod key;
pub mod manifest;
pub mod object;
pub mod pack;
