//! Policy errors: one line each, naming file, line, column and key.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum PolicyError {
    #[error("{}: cannot read the policy: {source}; check the path and its permissions", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}:{col}: {key}: {reason}", file.display())]
    Invalid {
        file: PathBuf,
        line: usize,
        col: usize,
        key: String,
        reason: String,
    },
}

impl PolicyError {
    /// The dotted key an `Invalid` error is about (`vm.mac`, `outbound[1].ports`).
    pub fn key(&self) -> Option<&str> {
        match self {
            PolicyError::Invalid { key, .. } => Some(key),
            PolicyError::Read { .. } => None,
        }
    }
}
