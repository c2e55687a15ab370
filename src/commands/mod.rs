//! One module per command; each takes its options as a plain struct that is
//! also its clap parser, so every option is declared once, beside its use.

pub mod backup;
pub mod check;
pub mod drill;
pub mod fetch;
pub mod list;
pub mod prune;
pub mod push;
pub mod restore;
pub mod status;
pub mod upgrade;
pub mod verify;

/// The cores this process may use: the default parallelism of `--jobs`.
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}
