//! The CLI's connection to the server: [`connect`] opens the admin socket, only to a
//! process of the expected uid, and [`status_error`] turns the server's answers into the
//! CLI's errors (the server's message, after the command).

use std::path::Path;
use std::time::Duration;

use carapace_common::error_chain;
use tonic::transport::Channel;
use tonic::{Code, Status};

use carapace_proto::admin::admin_client::AdminClient;

use crate::{Error, Result};

/// How long one admin call may take (minting may wait on a hardware key manager).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Connects to the admin socket: only to a process of this uid or `server_uid`.
pub(crate) async fn connect(
    socket: &Path,
    server_uid: Option<u32>,
) -> Result<AdminClient<Channel>> {
    let unreachable = |detail: String| Error::Io {
        context: format!(
            "cannot reach the server's admin socket {}",
            socket.display()
        ),
        source: std::io::Error::other(format!(
            "{detail} (is carapace-server running? is --admin-socket right?)"
        )),
    };
    let refused = |detail: String| {
        Error::PermissionDenied(format!(
            "refusing the admin socket {}: {detail}",
            socket.display()
        ))
    };
    let mut expected = vec![carapace_common::euid()];
    expected.extend(server_uid);
    // Defence in depth: the path must be one only root or the server could have made
    // (the peer check below is what decides).
    if let Err(e) = std::fs::symlink_metadata(socket) {
        return Err(unreachable(e.to_string()));
    }
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        carapace_common::check_socket_dir(dir, &expected, false).map_err(|e| {
            // Under the shipped unit the server runs as its own user and owns the
            // socket's directory: say how to trust it.
            if server_uid.is_none() && e.contains("is owned by uid") {
                refused(format!(
                    "{e}; if the server runs as that user, pass --server-uid UID (or set CARAPACE_SERVER_UID)"
                ))
            } else {
                refused(e)
            }
        })?;
    }
    let channel = carapace_common::uds_channel_checked(socket, Some(CALL_TIMEOUT), expected)
        .await
        .map_err(|e| match carapace_common::UnexpectedPeer::find(&e) {
            Some(p) => refused(format!(
                "{p} (if the server runs as uid {uid}, pass --server-uid {uid})",
                uid = p.uid
            )),
            None => unreachable(error_chain(&e)),
        })?;
    Ok(AdminClient::new(channel))
}

/// A server answer turned into the CLI's error: the server's message, after the command.
pub(super) fn status_error(cmd: &str, s: &Status) -> Error {
    let msg = format!("{cmd}: {}", s.message());
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange => Error::InvalidArgument(msg),
        Code::FailedPrecondition => Error::FailedPrecondition(msg),
        Code::NotFound => Error::NotFound(msg),
        Code::AlreadyExists => Error::AlreadyExists(msg),
        Code::PermissionDenied => Error::PermissionDenied(msg),
        Code::Unauthenticated => Error::Unauthenticated(msg),
        code => Error::Io {
            context: cmd.to_owned(),
            source: std::io::Error::other(format!("server error ({code:?}): {}", s.message())),
        },
    }
}
