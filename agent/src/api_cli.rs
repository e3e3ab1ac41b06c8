//! The client side of `carapace-agent api ...`: talks to a Workload API socket like any
//! workload would, and prints or saves what it receives.
//!
//! Private keys are written only to `svid.key` files (mode 0600) and never printed, in
//! human or JSON output.

use carapace_common::error_chain;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use carapace_core::bundle::{der_to_pem, pem_block};
use carapace_core::clock::{rfc3339, unix_now};
use carapace_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use carapace_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svid,
    X509svidRequest, X509svidResponse,
};
use tonic::transport::Channel;
use tonic::{Code, Status};
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use crate::{Error, Result};

/// How long [`healthcheck`] waits for the agent in total.
const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(10);

pub use carapace_proto::workload_client::{SecurityHeader, WorkloadClient};

/// A gRPC channel over the Unix socket `socket_path` (no security header).
pub(crate) async fn channel(socket_path: &Path) -> Result<Channel> {
    carapace_common::uds_channel(socket_path, None)
        .await
        .map_err(|e| {
            Error::Workload(format!(
                "cannot connect to the Workload API at {}: {}",
                socket_path.display(),
                error_chain(&e)
            ))
        })
}

/// Connects to the Workload API at `socket_path`.
pub async fn connect(socket_path: &Path) -> Result<WorkloadClient> {
    Ok(SpiffeWorkloadApiClient::with_interceptor(
        channel(socket_path).await?,
        SecurityHeader,
    ))
}

/// Turns a Workload API status into the agent's error; `PermissionDenied` names the
/// caller's own uid and gid, which is what the agent attested.
fn status_error(status: &Status) -> Error {
    if status.code() == Code::PermissionDenied {
        return Error::Workload(format!(
            "no identity issued for this process (uid={}, gid={})",
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw()
        ));
    }
    Error::Workload(format!(
        "Workload API error {:?}: {}",
        status.code(),
        status.message()
    ))
}

/// The first message of `FetchX509SVID`.
async fn first_x509(client: &mut WorkloadClient) -> Result<X509svidResponse> {
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    match stream.message().await {
        Ok(Some(m)) if !m.svids.is_empty() => Ok(m),
        Ok(Some(_)) => Err(Error::Workload(
            "the Workload API sent a response without SVIDs".into(),
        )),
        Ok(None) => Err(Error::Workload(
            "the Workload API closed the stream without a response".into(),
        )),
        Err(s) => Err(status_error(&s)),
    }
}

/// Splits concatenated DER certificates.
fn split_der(mut der: &[u8]) -> Result<Vec<X509Certificate<'_>>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, cert) = X509Certificate::from_der(der)
            .map_err(|e| Error::Crypto(format!("the Workload API sent a bad certificate: {e}")))?;
        out.push(cert);
        der = rest;
    }
    Ok(out)
}

fn time_left(expires_at: i64) -> String {
    let left = expires_at.saturating_sub(unix_now());
    let d = humantime::format_duration(Duration::from_secs(left.unsigned_abs()));
    if left >= 0 {
        format!("in {d}")
    } else {
        format!("expired {d} ago")
    }
}

/// One SVID of a response, decoded for display.
struct Decoded<'a> {
    svid: &'a X509svid,
    chain: Vec<X509Certificate<'a>>,
    bundle: Vec<X509Certificate<'a>>,
    expires_at: i64,
}

fn decode(svid: &X509svid) -> Result<Decoded<'_>> {
    let chain = split_der(&svid.x509_svid)?;
    let expires_at = chain
        .first()
        .ok_or_else(|| {
            Error::Workload(format!(
                "the SVID for {} has an empty chain",
                svid.spiffe_id
            ))
        })?
        .validity()
        .not_after
        .timestamp();
    Ok(Decoded {
        svid,
        chain,
        bundle: split_der(&svid.bundle)?,
        expires_at,
    })
}

fn chain_pem(svid: &X509svid) -> Result<String> {
    Ok(split_der(&svid.x509_svid)?
        .iter()
        .map(|c| der_to_pem(c.as_ref()))
        .collect())
}

fn bundle_pem(svid: &X509svid) -> Result<String> {
    Ok(split_der(&svid.bundle)?
        .iter()
        .map(|c| der_to_pem(c.as_ref()))
        .collect())
}

/// Creates (or truncates) `path` with `mode` before any byte is written, refusing to
/// follow a symlink, then writes `data`.
fn write_file(path: &Path, mode: u32, data: &[u8]) -> Result<()> {
    let ctx = || format!("writing {}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(Error::io(ctx()))?;
    // An existing file keeps its old mode through open(): narrow it before writing.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(Error::io(ctx()))?;
    f.write_all(data).map_err(Error::io(ctx()))?;
    f.sync_all().map_err(Error::io(ctx()))
}

/// Writes the SVIDs of `resp` into `dir`: the default identity as `svid.pem`/`svid.key`,
/// the others as `svid.N.pem`/`svid.N.key`, and the bundle as `bundle.pem`. Returns the
/// paths written.
fn write_svids(dir: &Path, resp: &X509svidResponse) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    let mut written = Vec::new();
    for (i, svid) in resp.svids.iter().enumerate() {
        let (cert_name, key_name) = if i == 0 {
            ("svid.pem".to_owned(), "svid.key".to_owned())
        } else {
            (format!("svid.{i}.pem"), format!("svid.{i}.key"))
        };
        let cert_path = dir.join(cert_name);
        write_file(&cert_path, 0o644, chain_pem(svid)?.as_bytes())?;
        written.push(cert_path);
        let key_path = dir.join(key_name);
        let key_pem = Zeroizing::new(pem_block("PRIVATE KEY", &svid.x509_svid_key));
        write_file(&key_path, 0o600, key_pem.as_bytes())?;
        written.push(key_path);
    }
    if let Some(first) = resp.svids.first() {
        let bundle_path = dir.join("bundle.pem");
        write_file(&bundle_path, 0o644, bundle_pem(first)?.as_bytes())?;
        written.push(bundle_path);
    }
    Ok(written)
}

/// The federated bundles of a `FetchX509SVID` message, sorted by trust domain ID: each
/// with its certificates.
fn federated_of(resp: &X509svidResponse) -> Result<Vec<(&str, Vec<X509Certificate<'_>>)>> {
    let mut out = resp
        .federated_bundles
        .iter()
        .map(|(td, der)| {
            split_der(der)
                .map(|certs| (td.as_str(), certs))
                .map_err(|e| Error::Workload(format!("the federated bundle of {td}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    out.sort_by(|a, b| a.0.cmp(b.0));
    Ok(out)
}

fn describe_human(
    decoded: &[Decoded<'_>],
    federated: &[(&str, Vec<X509Certificate<'_>>)],
    written: &[PathBuf],
) -> String {
    let mut out = String::new();
    let total = decoded.len();
    for (i, d) in decoded.iter().enumerate() {
        let default = if i == 0 { " (default)" } else { "" };
        let _ = writeln!(out, "SVID {} of {total}{default}", i + 1);
        let _ = writeln!(out, "  SPIFFE ID:  {}", d.svid.spiffe_id);
        let hint = if d.svid.hint.is_empty() {
            "(none)"
        } else {
            d.svid.hint.as_str()
        };
        let _ = writeln!(out, "  Hint:       {hint}");
        let _ = writeln!(
            out,
            "  Expires:    {} ({})",
            rfc3339(d.expires_at),
            time_left(d.expires_at)
        );
        let n = d.chain.len();
        let _ = writeln!(
            out,
            "  Chain:      {n} certificate{}",
            if n == 1 { "" } else { "s" }
        );
        for (j, c) in d.chain.iter().enumerate() {
            let _ = writeln!(out, "    [{j}] subject: {}", c.subject());
            let _ = writeln!(out, "        issuer:  {}", c.issuer());
        }
    }
    if let Some(first) = decoded.first() {
        let n = first.bundle.len();
        let _ = writeln!(
            out,
            "Bundle:       {n} X.509 authorit{}",
            if n == 1 { "y" } else { "ies" }
        );
    }
    for (td, certs) in federated {
        let n = certs.len();
        let _ = writeln!(
            out,
            "Federated:    {td}: {n} X.509 authorit{}",
            if n == 1 { "y" } else { "ies" }
        );
    }
    if !written.is_empty() {
        let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
        let _ = writeln!(out, "Wrote {}", names.join(", "));
    }
    out
}

fn describe_json(
    decoded: &[Decoded<'_>],
    federated: &[(&str, Vec<X509Certificate<'_>>)],
    written: &[PathBuf],
) -> Result<String> {
    let mut svids = Vec::new();
    for d in decoded {
        svids.push(serde_json::json!({
            "spiffe_id": d.svid.spiffe_id,
            "hint": d.svid.hint,
            "expires_at": rfc3339(d.expires_at),
            "expires_at_unix": d.expires_at,
            "chain_pem": chain_pem(d.svid)?,
            "bundle_pem": bundle_pem(d.svid)?,
        }));
    }
    let federated: serde_json::Map<String, serde_json::Value> = federated
        .iter()
        .map(|(td, certs)| {
            let pem: String = certs.iter().map(|c| der_to_pem(c.as_raw())).collect();
            ((*td).to_owned(), serde_json::Value::String(pem))
        })
        .collect();
    let mut doc = serde_json::json!({ "svids": svids, "federated_bundles": federated });
    if !written.is_empty() {
        doc["written"] = written
            .iter()
            .map(|p| serde_json::Value::String(p.display().to_string()))
            .collect();
    }
    serde_json::to_string_pretty(&doc).map_err(|e| Error::Workload(format!("JSON output: {e}")))
}

/// Fetches this process's X509-SVIDs (the first message of `FetchX509SVID`) and
/// describes them, as text or as JSON (`svids`: `spiffe_id`, `hint`, `expires_at`,
/// `expires_at_unix`, `chain_pem`, `bundle_pem`; `federated_bundles`: trust domain ID →
/// PEM, the bundles of the trust domains the caller's entries federate with). With
/// `write_dir`, also writes
/// `svid.pem`, `svid.key` (0600) and `bundle.pem` there (`svid.N.*` for further SVIDs).
/// The private key is never part of the returned text.
pub async fn fetch_x509(
    socket_path: &Path,
    write_dir: Option<&Path>,
    json: bool,
) -> Result<String> {
    let mut client = connect(socket_path).await?;
    let mut resp = first_x509(&mut client).await?;
    let result = (|| {
        let decoded = resp.svids.iter().map(decode).collect::<Result<Vec<_>>>()?;
        let federated = federated_of(&resp)?;
        let written = match write_dir {
            Some(dir) => write_svids(dir, &resp)?,
            None => Vec::new(),
        };
        if json {
            describe_json(&decoded, &federated, &written)
        } else {
            Ok(describe_human(&decoded, &federated, &written))
        }
    })();
    for svid in &mut resp.svids {
        zeroize::Zeroize::zeroize(&mut svid.x509_svid_key);
    }
    result
}

/// One line describing a `FetchX509SVID` message.
fn summary_line(resp: &X509svidResponse) -> String {
    let mut line = format!(
        "{} {} SVID{}:",
        rfc3339(unix_now()),
        resp.svids.len(),
        if resp.svids.len() == 1 { "" } else { "s" }
    );
    for svid in &resp.svids {
        let _ = write!(line, " {}", svid.spiffe_id);
        match split_der(&svid.x509_svid) {
            Ok(chain) => match chain.first() {
                Some(leaf) => {
                    let _ = write!(
                        line,
                        " (serial {}, expires {})",
                        leaf.raw_serial_as_string(),
                        rfc3339(leaf.validity().not_after.timestamp())
                    );
                }
                None => line.push_str(" (empty chain)"),
            },
            Err(e) => {
                let _ = write!(line, " ({e})");
            }
        }
        line.push(';');
    }
    line.pop();
    line
}

/// Watches `FetchX509SVID`, passing one summary line per message (time, SPIFFE IDs,
/// serials and expiries) to `out`, until the stream ends (`Ok`) or fails.
pub async fn watch_x509(socket_path: &Path, mut out: impl FnMut(String)) -> Result<()> {
    let mut client = connect(socket_path).await?;
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    loop {
        match stream.message().await {
            Ok(Some(mut resp)) => {
                out(summary_line(&resp));
                for svid in &mut resp.svids {
                    zeroize::Zeroize::zeroize(&mut svid.x509_svid_key);
                }
            }
            Ok(None) => return Ok(()),
            Err(s) => return Err(status_error(&s)),
        }
    }
}

/// Whether the result of a first stream message shows a live agent.
fn alive<T>(r: Result<Option<T>, Status>) -> Result<(), Status> {
    match r {
        Ok(Some(_)) => Ok(()),
        Err(s) if s.code() == Code::PermissionDenied => Ok(()),
        Ok(None) => Err(Status::unknown("stream closed without a response")),
        Err(s) => Err(s),
    }
}

/// Checks that an agent answers on `socket_path`: `FetchX509Bundles` (or, failing that,
/// `FetchX509SVID`) returns data or `PermissionDenied`. Gives up after 10 seconds.
pub async fn healthcheck(socket_path: &Path) -> Result<()> {
    let check = async {
        let mut client = connect(socket_path).await?;
        let bundles = match client.fetch_x509_bundles(X509BundlesRequest {}).await {
            Ok(r) => alive(r.into_inner().message().await),
            Err(s) => alive::<()>(Err(s)),
        };
        let Err(bundle_status) = bundles else {
            return Ok(());
        };
        let svid = match client.fetch_x509svid(X509svidRequest {}).await {
            Ok(r) => alive(r.into_inner().message().await.map(|m| {
                m.map(|mut m| {
                    for svid in &mut m.svids {
                        zeroize::Zeroize::zeroize(&mut svid.x509_svid_key);
                    }
                })
            })),
            Err(s) => alive::<()>(Err(s)),
        };
        svid.map_err(|s| {
            Error::Workload(format!(
                "agent unhealthy: FetchX509Bundles: {:?}: {}; FetchX509SVID: {:?}: {}",
                bundle_status.code(),
                bundle_status.message(),
                s.code(),
                s.message()
            ))
        })
    };
    tokio::time::timeout(HEALTHCHECK_TIMEOUT, check)
        .await
        .map_err(|_| {
            Error::Workload(format!(
                "agent unhealthy: no answer from {} within {}s",
                socket_path.display(),
                HEALTHCHECK_TIMEOUT.as_secs()
            ))
        })?
}

fn json_text(v: &serde_json::Value) -> Result<String> {
    serde_json::to_string_pretty(v).map_err(|e| Error::Workload(format!("JSON output: {e}")))
}

/// Fetches this process's JWT-SVIDs for `audiences` (`FetchJWTSVID`), narrowed to
/// `spiffe_id` when given, and describes them: per SVID its SPIFFE ID, hint, expiry
/// (read from the token, not verified here) and the token; as JSON, `svids`: `spiffe_id`,
/// `hint`, `token`, `audience`, `expires_at`, `expires_at_unix`.
pub async fn fetch_jwt(
    socket_path: &Path,
    audiences: &[String],
    spiffe_id: Option<&str>,
    json: bool,
) -> Result<String> {
    let mut client = connect(socket_path).await?;
    let resp = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: audiences.to_vec(),
            spiffe_id: spiffe_id.unwrap_or_default().to_owned(),
        })
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    if resp.svids.is_empty() {
        return Err(Error::Workload(
            "the Workload API sent a response without JWT-SVIDs".into(),
        ));
    }
    let mut out = String::new();
    let mut svids = Vec::new();
    let total = resp.svids.len();
    for (i, svid) in resp.svids.iter().enumerate() {
        let claims = carapace_core::jose::unverified_claims(
            &svid.svid,
            carapace_core::jose::MAX_TOKEN_BYTES,
        )
        .map_err(|e| {
            Error::Workload(format!(
                "the JWT-SVID for {} does not parse: {e}",
                svid.spiffe_id
            ))
        })?;
        let expires_at = claims.date("exp").ok().flatten().unwrap_or(0);
        let audience: Vec<String> = claims
            .audiences()
            .unwrap_or_default()
            .into_iter()
            .map(str::to_owned)
            .collect();
        if json {
            svids.push(serde_json::json!({
                "spiffe_id": svid.spiffe_id,
                "hint": svid.hint,
                "token": svid.svid,
                "audience": audience,
                "expires_at": rfc3339(expires_at),
                "expires_at_unix": expires_at,
            }));
            continue;
        }
        let default = if i == 0 { " (default)" } else { "" };
        let hint = if svid.hint.is_empty() {
            "(none)"
        } else {
            svid.hint.as_str()
        };
        let _ = writeln!(out, "JWT-SVID {} of {total}{default}", i + 1);
        let _ = writeln!(out, "  SPIFFE ID:  {}", svid.spiffe_id);
        let _ = writeln!(out, "  Hint:       {hint}");
        let _ = writeln!(out, "  Audience:   {}", audience.join(", "));
        let _ = writeln!(
            out,
            "  Expires:    {} ({})",
            rfc3339(expires_at),
            time_left(expires_at)
        );
        let _ = writeln!(out, "  Token:      {}", svid.svid);
    }
    if json {
        return json_text(&serde_json::json!({ "svids": svids }));
    }
    Ok(out)
}

/// Fetches the JWT bundles (the first message of `FetchJWTBundles`): per trust domain ID,
/// its JWKS document. As JSON, one object mapping each trust domain ID to its JWKS.
pub async fn fetch_jwt_bundle(socket_path: &Path, json: bool) -> Result<String> {
    let mut client = connect(socket_path).await?;
    let mut stream = client
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
        .map_err(|s| status_error(&s))?
        .into_inner();
    let resp = match stream.message().await {
        Ok(Some(m)) => m,
        Ok(None) => {
            return Err(Error::Workload(
                "the Workload API closed the stream without a response".into(),
            ));
        }
        Err(s) => return Err(status_error(&s)),
    };
    let mut bundles: Vec<(String, serde_json::Value)> = Vec::new();
    for (td, jwks) in resp.bundles {
        let v: serde_json::Value = serde_json::from_slice(&jwks)
            .map_err(|e| Error::Workload(format!("the JWT bundle of {td} is not JSON: {e}")))?;
        bundles.push((td, v));
    }
    bundles.sort_by(|a, b| a.0.cmp(&b.0));
    if json {
        let doc: serde_json::Map<String, serde_json::Value> = bundles.into_iter().collect();
        return json_text(&serde_json::Value::Object(doc));
    }
    let mut out = String::new();
    for (td, jwks) in &bundles {
        let n = jwks["keys"].as_array().map_or(0, Vec::len);
        let _ = writeln!(
            out,
            "Trust domain {td}: {n} JWT key{}",
            if n == 1 { "" } else { "s" }
        );
        let _ = writeln!(out, "{}", json_text(jwks)?);
    }
    Ok(out)
}

/// Asks the agent to validate `token` for `audience` (`ValidateJWTSVID`). On success,
/// the SPIFFE ID and the claims; as JSON `{"spiffe_id", "claims"}`. A refused token is an
/// error carrying the agent's reason.
pub async fn validate_jwt(
    socket_path: &Path,
    audience: &str,
    token: &str,
    json: bool,
) -> Result<String> {
    let mut client = connect(socket_path).await?;
    let resp = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: audience.to_owned(),
            svid: token.to_owned(),
        })
        .await
        .map_err(|s| {
            if s.code() == Code::InvalidArgument {
                Error::Workload(format!("the JWT-SVID is not valid: {}", s.message()))
            } else {
                status_error(&s)
            }
        })?
        .into_inner();
    let claims = resp.claims.map(struct_json).unwrap_or_default();
    if json {
        return json_text(&serde_json::json!({
            "spiffe_id": resp.spiffe_id,
            "claims": claims,
        }));
    }
    Ok(format!(
        "The JWT-SVID is valid.\n  SPIFFE ID:  {}\n  Claims:     {}\n",
        resp.spiffe_id,
        serde_json::Value::Object(claims)
    ))
}

/// A `google.protobuf.Struct` as JSON.
fn struct_json(s: prost_types::Struct) -> serde_json::Map<String, serde_json::Value> {
    s.fields
        .into_iter()
        .map(|(k, v)| (k, value_json(v)))
        .collect()
}

fn value_json(v: prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    use serde_json::Value;
    match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::NumberValue(n)) => {
            // Claims such as exp and iat are whole numbers: print them as such.
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                Value::from(n as i64)
            } else {
                serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.into_iter().map(value_json).collect()),
        Some(Kind::StructValue(s)) => Value::Object(struct_json(s)),
    }
}
