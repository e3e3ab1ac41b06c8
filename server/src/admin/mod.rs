//! The admin surface: the admin API the server serves on its Unix socket ([`api`]) and
//! the `carapace-server` subcommands that call it ([`cli`]).
//!
//! Both sides are split by noun, the same nouns on each side: `entry`, `agent`, `bundle`,
//! `token`, `x509` and `health`. Adding a noun means adding one file per side,
//! `api/<noun>.rs` (its RPCs) and `cli/<noun>.rs` (its commands, flags and output), plus
//! the one-line hook each side's `mod.rs` describes.

pub mod api;
pub mod cli;
