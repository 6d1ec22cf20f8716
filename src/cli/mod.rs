//! The commands behind `main.rs`'s table: each file holds one command's flags (clap `Args`)
//! and what it does, so a flag and the code that reads it are never far apart.

pub mod canary;
pub mod operator;
pub mod serve;

/// A runtime failure: moat started but could not do its job (or a canary attempt failed).
pub const EXIT_RUNTIME: u8 = 1;
/// Bad usage or a bad policy: nothing was started (clap's own usage errors exit 2 too).
pub const EXIT_USAGE: u8 = 2;
