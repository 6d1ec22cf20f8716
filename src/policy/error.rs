//! Policy errors: one line each, `<file>:<line>:<col>: <key>: <reason>`.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a policy was refused. Every variant but `Io` points at a place in the file: 1-based
/// line and column, the dotted key (`vm.mac`, `outbound[1].ports`) and a reason that says what
/// is wrong and what to do.
#[derive(Debug, Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{}: cannot read the policy: {source}; check the path and its permissions", file.display())]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
    /// The text is not TOML.
    #[error("{}:{line}:{col}: {key}: {reason}", file.display())]
    Syntax {
        file: PathBuf,
        line: usize,
        col: usize,
        key: String,
        reason: String,
    },
    /// A key the policy format does not have (usually a typo).
    #[error("{}:{line}:{col}: {key}: {reason}", file.display())]
    UnknownKey {
        file: PathBuf,
        line: usize,
        col: usize,
        key: String,
        reason: String,
    },
    /// A required key is absent; the position is that of the table it belongs in.
    #[error("{}:{line}:{col}: {key}: {reason}", file.display())]
    MissingKey {
        file: PathBuf,
        line: usize,
        col: usize,
        key: String,
        reason: String,
    },
    /// A value of the wrong type, or one that fails validation.
    #[error("{}:{line}:{col}: {key}: {reason}", file.display())]
    Invalid {
        file: PathBuf,
        line: usize,
        col: usize,
        key: String,
        reason: String,
    },
}

/// Where in the file an error is, and what it says: the fields shared by all variants but `Io`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location<'a> {
    pub file: &'a Path,
    pub line: usize,
    pub col: usize,
    pub key: &'a str,
    pub reason: &'a str,
}

impl PolicyError {
    /// File, line, column, key and reason; `None` for `Io`.
    pub fn location(&self) -> Option<Location<'_>> {
        match self {
            PolicyError::Io { .. } => None,
            PolicyError::Syntax {
                file,
                line,
                col,
                key,
                reason,
            }
            | PolicyError::UnknownKey {
                file,
                line,
                col,
                key,
                reason,
            }
            | PolicyError::MissingKey {
                file,
                line,
                col,
                key,
                reason,
            }
            | PolicyError::Invalid {
                file,
                line,
                col,
                key,
                reason,
            } => Some(Location {
                file,
                line: *line,
                col: *col,
                key,
                reason,
            }),
        }
    }

    /// The dotted key the error is about (`vm.mac`, `outbound[1].ports`); `None` for `Io`.
    pub fn key(&self) -> Option<&str> {
        self.location().map(|l| l.key)
    }
}
