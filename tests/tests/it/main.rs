//! The lighter multi-process tests, one binary: `azure_sas` (container-scoped SAS tokens on
//! Azurite), `boundaries` (the crate boundaries and the coordinator's wire layer), `verify`
//! (`lifeboat verify` on local and Azure stores). The group, lifecycle and recovery tests keep
//! binaries of their own: they run agents against freeze and ack deadlines and would measure
//! each other's load on 2 cores.

mod azure_sas;
mod boundaries;
mod verify;
