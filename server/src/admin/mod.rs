//! The admin surface: the `carapace-server` subcommands that call the admin API
//! ([`cli`]).

pub mod cli;
