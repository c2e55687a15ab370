//! One error type for every command, each kind with its own exit status.
//!
//! PostgreSQL treats an exit status above 125 (or a signal) from
//! archive_command/restore_command as fatal for the archiver or for recovery,
//! so every status here stays within 1..=125.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The file asked for is not in the repository (fetch: "end of archive").
    NotFound,
    /// Bad input: a name, a path, a URL, an option.
    Usage,
    /// The repository already holds something else under that name, or
    /// belongs to another cluster: refusing protects what is stored.
    Conflict,
    /// Stored bytes fail their own checks.
    Corrupt,
    /// Storage or local I/O failed; retrying may help.
    Io,
    /// A monitoring threshold is crossed (status --max-age).
    Stale,
    /// `check` found something that would make archiving or a restore fail.
    Unhealthy,
}

impl ErrorKind {
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::NotFound => 1,
            ErrorKind::Usage => 2,
            ErrorKind::Conflict => 3,
            ErrorKind::Corrupt => 4,
            ErrorKind::Io => 5,
            ErrorKind::Stale => 6,
            ErrorKind::Unhealthy => 7,
        }
    }
}

/// A one-line message that says what failed and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        // The message lands in PostgreSQL's server log: keep it on one line.
        let message = message.into().replace(['\n', '\r'], " ");
        Error { kind, message }
    }
    pub fn usage(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Usage, message)
    }
    pub fn conflict(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Conflict, message)
    }
    pub fn corrupt(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Corrupt, message)
    }
    pub fn io(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Io, message)
    }
    pub fn not_found(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::NotFound, message)
    }
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Attaches "what we were doing" to low-level errors.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(format!("{}: {e}", what())))
    }
}
