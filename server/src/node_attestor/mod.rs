//! Server-side node attestors built into the server.

mod join_token;

pub(crate) use join_token::server_rejected as join_token_rejected;
pub use join_token::{
    GeneratedToken, JoinTokenAttestor, NAME as JOIN_TOKEN, generate_join_token, presented_token,
};
