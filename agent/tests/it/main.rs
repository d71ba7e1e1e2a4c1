//! The agent's lighter end-to-end tests, one binary so that their waits overlap: `azure`
//! (Azurite as the store), `cache_damage`, `check` (the preflight), `errors` (bad input
//! changes nothing), `hooks`, `property` (restores equal the source under random changes),
//! `status`. The ones that freeze filesystems, measure stalls or kill the agent mid-write
//! (`block_device`, `crash`, `directory_freeze`, `freeze`, `run`) keep binaries of their own:
//! they are timed against deadlines and would measure each other's load on 2 cores.

#[path = "../common/mod.rs"]
mod common;

mod azure;
mod cache_damage;
mod check;
mod errors;
mod hooks;
mod property;
mod service;
mod status;
