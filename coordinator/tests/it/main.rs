//! The coordinator's integration tests, one binary so that their waits (deadlines, restarts,
//! timers) overlap instead of adding up: `peers` (enrolment, certificates, hostile and
//! malformed clients, stopping), `processing` (the data plane as the serving loop drives it),
//! `protocol` (the cut protocol's rules, jobs, shutdown).

mod peers;
mod processing;
mod protocol;
