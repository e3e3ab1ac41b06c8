//! `carapace-lab up|down`.
fn main() {}
