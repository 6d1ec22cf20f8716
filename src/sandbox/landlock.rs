//! Landlock: the filesystem and TCP-connect rights moat keeps once it serves.
//!
//! Rules are attached to directories, not files: an operator who edits the policy with
//! write-to-temp-and-rename gets a new inode, which a rule on the old file would not cover.
//! TCP binds are not restricted: run-time forwards (`moat forward add`) bind ports chosen
//! later. UDP has no Landlock rights (the DNS upstream and SOCKS5 UDP relays use it).

use std::path::{Path, PathBuf};

use landlock::{
    path_beneath_rules, Access, AccessFs, AccessNet, NetPort, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use super::{Enforced, Needs, SandboxError};

/// The newest ABI moat knows; older kernels get what they support (best effort), and the
/// start-up log says how much was enforced.
const ABI_WANTED: ABI = ABI::V6;

/// The directory a path lives in (the path itself for a directory), absolute.
fn directory_of(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    if abs.is_dir() {
        return abs;
    }
    abs.parent().map(Path::to_path_buf).unwrap_or(abs)
}

/// Restrict this thread and every thread it starts from now on.
pub fn restrict(needs: &Needs) -> Result<Enforced, SandboxError> {
    let err = |e: landlock::RulesetError| SandboxError::Landlock(e.to_string());
    let read_dirs: Vec<PathBuf> = needs.reads.iter().map(|p| directory_of(p)).collect();
    let socket_dirs: Vec<PathBuf> = needs.sockets.iter().map(|p| directory_of(p)).collect();
    let socket_rights = AccessFs::MakeSock | AccessFs::RemoveFile;
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI_WANTED))
        .map_err(err)?
        .handle_access(AccessNet::ConnectTcp)
        .map_err(err)?
        .scope(Scope::AbstractUnixSocket | Scope::Signal)
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(
            &read_dirs,
            AccessFs::from_read(ABI_WANTED),
        ))
        .map_err(err)?
        .add_rules(path_beneath_rules(&socket_dirs, socket_rights))
        .map_err(err)?;
    for &port in &needs.connect_ports {
        ruleset = ruleset
            .add_rule(NetPort::new(port, AccessNet::ConnectTcp))
            .map_err(err)?;
    }
    let status = ruleset.restrict_self().map_err(err)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Enforced::Fully,
        RulesetStatus::PartiallyEnforced => Enforced::Partially,
        _ => Enforced::Not,
    })
}
