//! The admin socket: binding it owner-only and serving the admin API on it.

use std::future::Future;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use tokio::net::UnixListener;

use carapace_proto::admin::admin_server::AdminServer;

use super::AdminApi;
use crate::{Error, Result};

/// Mode of the admin socket: owner only.
const SOCKET_MODE: u32 = 0o600;

/// Binds the admin socket at `path`, after checking every directory on its path
/// ([`carapace_common::check_socket_dir`]: owned by root or this process's uid, writable
/// by no one else but for one shared sticky directory like `/tmp`, the socket's own
/// directory private; missing ones are created 0700, existing ones are never changed),
/// removes a stale socket left by a previous run (never a file that is not a socket,
/// never a socket someone still listens on), binds, and makes the socket owner-only
/// (0600).
pub fn bind(path: &Path) -> Result<UnixListener> {
    let shown = path.display();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => {
            return Err(Error::Config(format!(
                "admin socket {shown}: the path needs a directory part (e.g. /tmp/carapace-server/private/admin.sock)"
            )));
        }
    };
    let refused = |e: String| {
        Error::Config(format!(
            "admin socket {shown}: {e}; refusing to serve the admin API there"
        ))
    };
    carapace_common::check_socket_dir(dir, &[carapace_common::euid()], true).map_err(refused)?;
    carapace_common::remove_stale_socket(path, "carapace-server")
        .map_err(|e| Error::Config(format!("admin socket {shown}: {e}")))?;
    let listener = UnixListener::bind(path).map_err(|e| {
        if e.kind() == ErrorKind::AddrInUse {
            Error::Config(format!(
                "admin socket {shown}: address in use (is another carapace-server running?)"
            ))
        } else {
            Error::Io {
                context: format!("admin socket {shown}: cannot bind"),
                source: e,
            }
        }
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(
        Error::io(format!("admin socket {shown}: cannot set mode 600")),
    )?;
    Ok(listener)
}

/// Admin connections open at once.
const MAX_CONNECTIONS: usize = 64;
/// How long an admin connection stays open without an RPC in progress.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves the admin API on `listener` until `shutdown` resolves: at most
/// `MAX_CONNECTIONS` (64) connections, each closed after `IDLE_TIMEOUT` (60 s) without an
/// RPC; accept errors (out of descriptors) back off instead of spinning.
pub async fn serve<F>(listener: UnixListener, api: AdminApi, shutdown: F) -> Result<()>
where
    F: Future<Output = ()> + Send,
{
    use carapace_common::listener::{Limits, TrackRpcsLayer, UnixConnInfo, unix_incoming};
    let limits = Limits {
        max_connections: MAX_CONNECTIONS,
        max_per_peer: MAX_CONNECTIONS,
    };
    tonic::transport::Server::builder()
        .layer(TrackRpcsLayer::<UnixConnInfo>::new())
        .add_service(AdminServer::new(api))
        .serve_with_incoming_shutdown(
            unix_incoming(listener, "admin API", limits, Some(IDLE_TIMEOUT)),
            shutdown,
        )
        .await
        .map_err(|e| Error::Io {
            context: "admin API".into(),
            source: std::io::Error::other(e),
        })
}
