//! What every admin command shares in its output: the `--output` format, JSON encoding,
//! and the primitives of the SPIRE-like human layout (`Label            : value` lines,
//! times as RFC 3339, singular or plural nouns).
//!
//! A noun's views (the structs it prints) and its `format_*_human` functions live in the
//! noun's own module; they are pure functions over the views, tested without a server.

use std::fmt::Write as _;

use clap::ValueEnum;
use serde::Serialize;

use crate::{Error, Result};

/// Output format of the admin commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable text.
    Human,
    /// JSON, for scripts.
    Json,
}

/// Unix seconds as RFC 3339 (UTC, seconds): core's one formatter, which prints any
/// stored value (one outside 1970..=9999 as `unix <n>`).
pub use carapace_core::clock::rfc3339;

/// One `Label            : value` line of the human layout.
pub(super) fn field(out: &mut String, label: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{label:<17}: {value}");
}

/// `one` or `many`, by `n`.
pub(super) fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}

/// `v` as pretty JSON, ending with a newline.
pub(super) fn json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string_pretty(v)
        .map(|s| s + "\n")
        .map_err(|e| Error::InvalidArgument(format!("cannot encode the output as JSON: {e}")))
}

/// `v` in the chosen format: `human(v)`, or JSON.
pub(super) fn render<T: Serialize>(
    output: OutputFormat,
    v: &T,
    human: impl FnOnce(&T) -> String,
) -> Result<String> {
    match output {
        OutputFormat::Human => Ok(human(v)),
        OutputFormat::Json => json(v),
    }
}
