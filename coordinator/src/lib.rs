//! Lifeboat's coordinator: one per replication group, serving port 20004. It enrols agents
//! (private CA, one-time join tokens), keeps their sessions, runs the cut protocol that makes
//! shared crash- and app-consistent recovery points, and publishes them to the store.

pub mod api;
pub mod config;
pub mod group;
pub mod hub;
pub mod jobs;
pub mod listener;
pub mod pki;
pub mod server;
pub mod tokens;
pub mod work;
