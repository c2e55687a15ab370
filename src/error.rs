//! One error type for every command, each kind with its own exit status.
//!
//! PostgreSQL treats an exit status above 125 (or a signal) from
//! archive_command/restore_command as fatal for the archiver or for recovery,
//! so every status here stays within 1..=125, except where stopping is the
//! point: a fetch that fails during archive recovery (see
//! [`Error::stopping_recovery`]) exits [`STOPS_RECOVERY`] plus its status,
//! and such a fetch that panics (a bug) exits [`STOPS_RECOVERY`] itself.

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

/// A one-line message that says what failed and what to do. When another
/// error caused it (an I/O error under [`Context`]), that error is kept as
/// the [`source`](std::error::Error::source); the message already says it,
/// so `Display` is the message alone.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorKind,
    message: String,
    stops_recovery: bool,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
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
            source: None,
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
    /// The same error, caused by `source` (which its message already names).
    pub fn with_source(
        self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Error {
        Error {
            source: Some(source.into()),
            ..self
        }
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

/// Attaches "what we were doing" to low-level errors.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(format!("{}: {e}", what())).with_source(e))
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

    #[test]
    fn context_keeps_the_io_error_as_the_source() {
        use std::error::Error as _;
        let failed: std::io::Result<()> = Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "denied",
        ));
        let e = failed.context(|| "cannot open x".into()).unwrap_err();
        assert_eq!(e.to_string(), "cannot open x: denied");
        assert_eq!(e.exit_code(), 5);
        let e = e.stopping_recovery("do this");
        assert_eq!(e.to_string(), "cannot open x: denied; do this");
        let source = e.source().and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(
            source.map(std::io::Error::kind),
            Some(std::io::ErrorKind::PermissionDenied)
        );
        assert!(Error::io("x").source().is_none());
    }
}
