//! `lifeboat-agent`: entry point; owns exit codes.
fn main() {}
