//! card-os's errors: what failed, in words, with its cause once (the cause is part of the
//! message, not a separate `source`, so a chain printer does not repeat it).

use std::process::ExitStatus;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The card's file.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A program ran and failed; its output.
    #[error("{command} failed ({status}): {output}")]
    Command {
        command: String,
        status: ExitStatus,
        output: String,
    },
    /// A program could not be started.
    #[error("cannot run {command}: {cause}")]
    Spawn {
        command: String,
        cause: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    /// Anything else, in words (a missing program with its package, a peer that does not
    /// answer, ...).
    #[error("{0}")]
    Failed(String),
    /// `what` failed because of `cause`.
    #[error("{what}: {cause}")]
    Context { what: String, cause: Box<Error> },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Says what was being done when an error happened.
pub trait Context<T> {
    fn context(self, what: impl Into<String>) -> Result<T>;
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::Context {
            what: what.into(),
            cause: Box::new(e.into()),
        })
    }

    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| Error::Context {
            what: what().into(),
            cause: Box::new(e.into()),
        })
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.ok_or_else(|| Error::Failed(what.into()))
    }

    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.ok_or_else(|| Error::Failed(what().into()))
    }
}

/// `return Err(Error::Failed(format!(...)))`.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::Failed(format!($($arg)*)))
    };
}
