//! Policy errors: one line each, `<file>:<line>:<col>: <key>: <reason>`.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a policy was refused: the file could not be read, or a place in it is wrong.
#[derive(Debug, Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{}: cannot read the policy: {source}; check the path and its permissions", file.display())]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
    /// A place in the file: syntax, shape or meaning.
    #[error(transparent)]
    At(#[from] Located),
}

/// Which step refused the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The text is not TOML.
    Syntax,
    /// A key the policy format does not have (usually a typo).
    UnknownKey,
    /// A required key is absent; the position is that of the table it belongs in.
    MissingKey,
    /// A value of the wrong type, or one that fails validation.
    Invalid,
}

/// An error at a place in a policy file: 1-based line and column (in characters), the dotted
/// key (`vm.mac`, `outbound[1].ports`) and a reason that says what is wrong and what to do.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{}:{line}:{col}: {key}: {reason}", file.display())]
pub struct Located {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub key: String,
    pub reason: String,
    pub kind: ErrorKind,
}

/// Where in the file an error is, and what it says: a borrowed view of a [`Located`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location<'a> {
    pub file: &'a Path,
    pub line: usize,
    pub col: usize,
    pub key: &'a str,
    pub reason: &'a str,
}

impl Located {
    /// The borrowed view callers match on.
    pub fn location(&self) -> Location<'_> {
        Location {
            file: &self.file,
            line: self.line,
            col: self.col,
            key: &self.key,
            reason: &self.reason,
        }
    }
}

impl PolicyError {
    /// File, line, column, key and reason; `None` for `Io`.
    pub fn location(&self) -> Option<Location<'_>> {
        self.located().map(Located::location)
    }

    /// The error at a place in the file; `None` for `Io`.
    pub fn located(&self) -> Option<&Located> {
        match self {
            PolicyError::Io { .. } => None,
            PolicyError::At(located) => Some(located),
        }
    }

    /// Which step refused the policy; `None` for `Io`.
    pub fn kind(&self) -> Option<ErrorKind> {
        self.located().map(|l| l.kind)
    }

    /// The dotted key the error is about (`vm.mac`, `outbound[1].ports`); `None` for `Io`.
    pub fn key(&self) -> Option<&str> {
        self.location().map(|l| l.key)
    }
}
