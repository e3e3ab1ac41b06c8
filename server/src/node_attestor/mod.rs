//! Server-side node attestors built into the server.

mod join_token;

pub use join_token::{GeneratedToken, JoinTokenAttestor, generate_join_token};
