//! `lifeboat`: the admin CLI; owns exit codes.
fn main() {}
