//! One error type for every command, each kind with its own exit status.
//!
//! PostgreSQL treats an exit status above 125 (or a signal) from
//! archive_command/restore_command as fatal for the archiver or for recovery,
//! so every status here stays within 1..=125, except where stopping is the
//! point: a fetch that fails during archive recovery (see
//! [`Error::stopping_recovery`]) exits [`STOPS_RECOVERY`] plus its status,
//! and such a fetch that panics (a bug) exits [`STOPS_RECOVERY`] itself.

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

/// Added to a status to make PostgreSQL stop archive recovery with FATAL
/// (it reads 1..=125 from restore_command as "not in the archive" and then
/// ends recovery early); 200 keeps the cause readable: 204 damaged, 205 I/O.
pub const STOPS_RECOVERY: u8 = 200;

/// A one-line message that says what failed and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    message: String,
    stops_recovery: bool,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        // The message lands in PostgreSQL's server log: keep it on one line.
        let message = message.into().replace(['\n', '\r'], " ");
        Error {
            kind,
            message,
            stops_recovery: false,
        }
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
    /// The same failure, reported with a status above 125 so that PostgreSQL
    /// stops recovery instead of taking it for the end of the archive;
    /// `advice` (what to do now) is appended to the message.
    pub fn stopping_recovery(self, advice: &str) -> Error {
        Error {
            message: format!("{}; {}", self.message, advice.replace(['\n', '\r'], " ")),
            stops_recovery: true,
            ..self
        }
    }
    pub fn stops_recovery(&self) -> bool {
        self.stops_recovery
    }
    /// The process's exit status for this error.
    pub fn exit_code(&self) -> u8 {
        if self.stops_recovery {
            STOPS_RECOVERY + self.kind.exit_code()
        } else {
            self.kind.exit_code()
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_stay_below_126_unless_stopping_recovery() {
        for kind in [
            ErrorKind::NotFound,
            ErrorKind::Usage,
            ErrorKind::Conflict,
            ErrorKind::Corrupt,
            ErrorKind::Io,
            ErrorKind::Stale,
        ] {
            let e = Error::new(kind, "x");
            assert!((1..=125).contains(&e.exit_code()));
            let stopped = e.stopping_recovery("do this");
            assert_eq!(stopped.exit_code(), 200 + kind.exit_code());
            assert!(stopped.exit_code() > 125);
            assert_eq!(stopped.message(), "x; do this");
        }
        assert_eq!(Error::corrupt("x").stopping_recovery("y").exit_code(), 204);
        assert_eq!(Error::io("x").stopping_recovery("y\nz").message(), "x; y z");
    }
}
