// Shared by the datapath targets: one Datapath built from the fixed test policy.
#![allow(dead_code)]
use std::path::Path;
use std::sync::{Arc, Mutex};

use moat::datapath::Datapath;
use moat::policy::Policy;
use moat::services::dns::NamePool;
use moat::telemetry::Counters;

pub const POLICY: &str = include_str!("../policy.toml");

pub fn policy() -> Policy {
    Policy::parse(POLICY, Path::new("fuzz/policy.toml")).expect("fuzz policy parses")
}

pub fn datapath() -> Datapath {
    Datapath::new(
        Arc::new(policy()),
        Arc::new(Mutex::new(NamePool::new(64))),
        Arc::new(Counters::default()),
    )
}
