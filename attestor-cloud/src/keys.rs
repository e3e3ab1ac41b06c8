//! Where a JWT plugin's signing keys come from: a file, or an HTTPS URL fetched in the
//! background. What `gcp_iit` (`[node_attestor.gcp_iit]`) and each `azure_msi` tenant
//! (`tenants.<id>`) configure with the same four settings.
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `keys_path` | | a key file (JWKS or Google's certificate map, see [`crate::jwt`]), relative to the server's data dir; re-read when it changes |
//! | `keys_url` | | an `https://` URL serving the same formats, fetched in the background |
//! | `keys_refresh` | `1h` | with `keys_url`: how often the keys are fetched again (from `1m` to `24h`) |
//! | `keys_ca_file` | the system's trust store | with `keys_url`: PEM certificates of the CAs trusted for that URL, relative to the server's data dir |
//!
//! Exactly one of `keys_path` and `keys_url` is required.
//!
//! # Keys from a URL
//!
//! **Nothing is fetched at attestation time.** When the attestor is created, a background
//! task (on the server's tokio runtime) fetches the URL at once, then every
//! `keys_refresh`; attestations use whatever set it fetched last. The fetch is an HTTPS
//! GET only: plain `http://` is refused, with no exception, because the keys decide whose
//! tokens are believed. The server's certificate is verified (webpki, SNI the URL's host)
//! against `keys_ca_file` when set, else the system's trust store; TLS 1.2 or 1.3 with
//! the ring provider; the whole exchange within 10 s; at most 1 MiB of body; a non-2xx
//! status, including a redirect, is a failure. The body is parsed like a key file (same
//! formats, same rules: RSA keys of 2048 to 8192 bits, `kid`s unique).
//!
//! Each successful fetch is logged at info with the URL and the key ids. A failed one
//! (connection, TLS, HTTP status, a body that is not a key set) is logged as a warning
//! naming the URL and the error; the last good key set stays in use, and the fetch is
//! retried sooner: after 30 s, then doubling, up to `keys_refresh`. Until the first fetch
//! succeeds, attestations fail as *unavailable* (`keys not yet fetched from <url>: <the
//! last error>`), which the agent retries, rather than as rejected. The task stops when
//! the attestor is dropped.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use carapace_core::Error;
use carapace_core::files::{FileUse, NamedFile};

use crate::config_err;
use crate::https::{self, HttpsClient, HttpsUrl};
use crate::jwt::{KeyFile, KeySet, KeySetFiles as _};

/// The default `keys_refresh`.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(3600);

/// The smallest `keys_refresh` accepted.
pub const MIN_REFRESH: Duration = Duration::from_secs(60);

/// The largest `keys_refresh` accepted.
pub const MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);

/// The wait before the first retry after a failed fetch; it doubles with each further
/// failure, up to `keys_refresh`.
pub const FIRST_RETRY: Duration = Duration::from_secs(30);

/// The intervals of the background fetch. Only tests change them (through the attestors'
/// hidden `new_with_fetch_timing`), to see refreshes and retries in milliseconds: the
/// configuration itself never allows less than [`MIN_REFRESH`].
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchTiming {
    /// Replaces every configured `keys_refresh` when set.
    pub refresh: Option<Duration>,
    /// The first retry after a failure ([`FIRST_RETRY`] normally).
    pub first_retry: Duration,
}

impl Default for FetchTiming {
    fn default() -> Self {
        FetchTiming {
            refresh: None,
            first_retry: FIRST_RETRY,
        }
    }
}

/// The four key settings as written, with `prefix` (`""` or `"tenants.<id>."`) naming
/// them in messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeySettings<'a> {
    pub(crate) prefix: &'a str,
    pub(crate) keys_path: Option<&'a Path>,
    pub(crate) keys_url: Option<&'a str>,
    pub(crate) keys_refresh: Option<Duration>,
    pub(crate) keys_ca_file: Option<&'a Path>,
}

impl KeySettings<'_> {
    /// Every problem that can be found without reading files or the network.
    pub(crate) fn problems(&self) -> Vec<String> {
        let p = self.prefix;
        let mut problems = Vec::new();
        match (self.keys_path, self.keys_url) {
            (Some(_), Some(_)) => problems.push(format!(
                "{p}keys_path and {p}keys_url are both set: choose one (a file kept up to \
                 date, or an https:// URL fetched in the background)"
            )),
            (None, None) => problems.push(format!(
                "{p}keys_path or {p}keys_url is required: the signing keys as a file, or an \
                 https:// URL to fetch them from"
            )),
            _ => {}
        }
        if self.keys_path.is_some_and(|k| k.as_os_str().is_empty()) {
            problems.push(format!("{p}keys_path is empty"));
        }
        if let Some(url) = self.keys_url
            && let Err(e) = HttpsUrl::parse(url)
        {
            problems.push(format!("{p}keys_url: {e}"));
        }
        if let Some(refresh) = self.keys_refresh {
            if self.keys_url.is_none() {
                problems.push(format!(
                    "{p}keys_refresh is set but {p}keys_url is not (a keys_path file is \
                     re-read whenever it changes)"
                ));
            } else if !(MIN_REFRESH..=MAX_REFRESH).contains(&refresh) {
                problems.push(format!(
                    "{p}keys_refresh {refresh:?} must be between {MIN_REFRESH:?} and \
                     {MAX_REFRESH:?}"
                ));
            }
        }
        if let Some(ca) = self.keys_ca_file {
            if self.keys_url.is_none() {
                problems.push(format!(
                    "{p}keys_ca_file is set but {p}keys_url is not (it names the CAs trusted \
                     for the key URL)"
                ));
            } else if ca.as_os_str().is_empty() {
                problems.push(format!("{p}keys_ca_file is empty"));
            }
        }
        problems
    }

    /// The files these settings name, for `validate`, resolved against `base_dir` as
    /// [`Self::open`] does: `keys_path`, or with `keys_url` its `keys_ca_file`.
    pub(crate) fn files(&self, base_dir: &Path) -> Vec<NamedFile> {
        let p = self.prefix;
        let non_empty = |f: &&Path| !f.as_os_str().is_empty();
        match (self.keys_path, self.keys_url) {
            (Some(path), _) => Some(path)
                .filter(non_empty)
                .map(|f| NamedFile::new(format!("{p}keys_path"), base_dir.join(f), FileUse::Read))
                .into_iter()
                .collect(),
            (None, Some(_)) => self
                .keys_ca_file
                .filter(non_empty)
                .map(|f| {
                    NamedFile::new(format!("{p}keys_ca_file"), base_dir.join(f), FileUse::Read)
                })
                .into_iter()
                .collect(),
            (None, None) => Vec::new(),
        }
    }

    /// Opens the key source of valid settings: loads the file, or reads the roots and
    /// starts the background fetch (which needs a running tokio runtime). `label` names
    /// the source in logs and errors (`gcp_iit`, `azure_msi: tenant <id>`).
    pub(crate) fn open(
        &self,
        plugin: &str,
        label: String,
        base_dir: &Path,
        timing: FetchTiming,
    ) -> Result<Keys, Error> {
        let p = self.prefix;
        if let Some(path) = self.keys_path {
            let path = base_dir.join(path);
            let file = KeyFile::open(&path)
                .map_err(|e| config_err(plugin, format!("{p}keys_path: {e}")))?;
            return Ok(Keys::File(file));
        }
        let url = self.keys_url.ok_or_else(|| {
            config_err(plugin, format!("{p}keys_path or {p}keys_url is required"))
        })?;
        let url =
            HttpsUrl::parse(url).map_err(|e| config_err(plugin, format!("{p}keys_url: {e}")))?;
        let roots = match self.keys_ca_file {
            Some(ca) => https::roots_from_ca_file(&base_dir.join(ca))
                .map_err(|e| config_err(plugin, format!("{p}keys_ca_file: {e}")))?,
            None => https::system_roots()
                .map_err(|e| config_err(plugin, format!("{p}keys_url {url}: {e}")))?,
        };
        let client = HttpsClient::new(roots).map_err(|e| config_err(plugin, e))?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            config_err(
                plugin,
                format!(
                    "{p}keys_url: the keys are fetched by a background task, which needs a \
                     running tokio runtime ({e})"
                ),
            )
        })?;
        let refresh = timing
            .refresh
            .or(self.keys_refresh)
            .unwrap_or(DEFAULT_REFRESH);
        let first_retry = timing.first_retry.min(refresh);
        Ok(Keys::Url(UrlKeys::start(
            &runtime,
            label,
            url,
            client,
            refresh,
            first_retry,
        )))
    }
}

/// A key source: a file, or a URL fetched in the background.
#[derive(Debug)]
pub(crate) enum Keys {
    /// `keys_path`.
    File(KeyFile),
    /// `keys_url`.
    Url(UrlKeys),
}

impl Keys {
    /// The keys to verify with now. A URL whose first fetch has not succeeded yet is
    /// [`Error::Unavailable`]; nothing is fetched here.
    pub(crate) fn current(&self) -> Result<Arc<KeySet>, Error> {
        match self {
            Keys::File(file) => Ok(file.keys()),
            Keys::Url(url) => url.current(),
        }
    }

    /// Where the keys come from, for logs.
    pub(crate) fn source(&self) -> String {
        match self {
            Keys::File(file) => file.path().display().to_string(),
            Keys::Url(url) => url.url.to_string(),
        }
    }

    /// The key ids known now (none for a URL not fetched yet), for logs.
    pub(crate) fn kids(&self) -> Vec<String> {
        match self.current() {
            Ok(set) => set.kids().map(str::to_owned).collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// What the background fetch has produced so far.
#[derive(Debug, Default)]
struct Fetched {
    /// The last good key set; `None` until a fetch succeeds.
    keys: Option<Arc<KeySet>>,
    /// The error of the last fetch, if it failed.
    last_error: Option<String>,
}

/// Aborts the background task when the source (and so its attestor) is dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keys fetched from an HTTPS URL by a background task.
#[derive(Debug)]
pub(crate) struct UrlKeys {
    label: String,
    url: HttpsUrl,
    fetched: Arc<Mutex<Fetched>>,
    _task: AbortOnDrop,
}

impl UrlKeys {
    fn start(
        runtime: &tokio::runtime::Handle,
        label: String,
        url: HttpsUrl,
        client: HttpsClient,
        refresh: Duration,
        first_retry: Duration,
    ) -> UrlKeys {
        let fetched = Arc::new(Mutex::new(Fetched::default()));
        tracing::info!(
            source = %label,
            url = %url,
            refresh = ?refresh,
            "signing keys will be fetched in the background"
        );
        let task = runtime.spawn(refresh_loop(
            label.clone(),
            url.clone(),
            client,
            Arc::downgrade(&fetched),
            refresh,
            first_retry,
        ));
        UrlKeys {
            label,
            url,
            fetched,
            _task: AbortOnDrop(task.abort_handle()),
        }
    }

    fn current(&self) -> Result<Arc<KeySet>, Error> {
        let fetched = self.fetched.lock().unwrap_or_else(PoisonError::into_inner);
        match &fetched.keys {
            Some(keys) => Ok(keys.clone()),
            None => Err(Error::Unavailable(format!(
                "{}: keys not yet fetched from {}: {}",
                self.label,
                self.url,
                fetched
                    .last_error
                    .as_deref()
                    .unwrap_or("the first fetch is under way")
            ))),
        }
    }
}

/// Fetches `url` at once and then every `refresh`, retrying failures after `first_retry`
/// (doubling, at most `refresh`); stops when `fetched` is gone.
async fn refresh_loop(
    label: String,
    url: HttpsUrl,
    client: HttpsClient,
    fetched: Weak<Mutex<Fetched>>,
    refresh: Duration,
    first_retry: Duration,
) {
    let mut retry = first_retry;
    loop {
        let result = client
            .get(&url)
            .await
            .and_then(|body| KeySet::from_json(&body).map_err(|e| format!("not a key set: {e}")));
        let Some(fetched) = fetched.upgrade() else {
            return;
        };
        let wait = {
            let mut fetched = fetched.lock().unwrap_or_else(PoisonError::into_inner);
            match result {
                Ok(keys) => {
                    tracing::info!(
                        source = %label,
                        url = %url,
                        kids = ?keys.kids().collect::<Vec<_>>(),
                        "signing keys fetched"
                    );
                    fetched.keys = Some(Arc::new(keys));
                    fetched.last_error = None;
                    retry = first_retry;
                    refresh
                }
                Err(e) => {
                    let wait = retry;
                    retry = retry.saturating_mul(2).min(refresh);
                    match &fetched.keys {
                        Some(keys) => tracing::warn!(
                            source = %label,
                            url = %url,
                            error = %e,
                            kids = ?keys.kids().collect::<Vec<_>>(),
                            retry_in = ?wait,
                            "fetching signing keys failed; still verifying with the keys fetched before"
                        ),
                        None => tracing::warn!(
                            source = %label,
                            url = %url,
                            error = %e,
                            retry_in = ?wait,
                            "fetching signing keys failed; attestations are unavailable until a fetch succeeds"
                        ),
                    }
                    fetched.last_error = Some(e);
                    wait
                }
            }
        };
        drop(fetched);
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn settings<'a>(
        path: Option<&'a str>,
        url: Option<&'a str>,
        refresh: Option<u64>,
        ca: Option<&'a str>,
    ) -> Vec<String> {
        KeySettings {
            prefix: "t.",
            keys_path: path.map(Path::new),
            keys_url: url,
            keys_refresh: refresh.map(Duration::from_secs),
            keys_ca_file: ca.map(Path::new),
        }
        .problems()
    }

    #[test]
    fn exactly_one_source_with_sane_url_settings() {
        assert!(settings(Some("k.json"), None, None, None).is_empty());
        assert!(settings(None, Some("https://h/k"), Some(60), Some("ca.pem")).is_empty());
        assert!(settings(None, Some("https://h/k"), Some(86_400), None).is_empty());
        for (problems, want) in [
            (
                settings(Some("k"), Some("https://h/k"), None, None),
                "t.keys_path and t.keys_url are both set",
            ),
            (
                settings(None, None, None, None),
                "t.keys_path or t.keys_url is required",
            ),
            (settings(Some(""), None, None, None), "t.keys_path is empty"),
            (
                settings(None, Some("http://h/k"), None, None),
                "t.keys_url: \"http://h/k\": plain http:// is refused",
            ),
            (
                settings(None, Some("https://h/k"), Some(59), None),
                "t.keys_refresh 59s must be between 60s and 86400s",
            ),
            (
                settings(None, Some("https://h/k"), Some(86_401), None),
                "t.keys_refresh 86401s must be between",
            ),
            (
                settings(Some("k"), None, Some(60), None),
                "t.keys_refresh is set but t.keys_url is not",
            ),
            (
                settings(Some("k"), None, None, Some("ca.pem")),
                "t.keys_ca_file is set but t.keys_url is not",
            ),
            (
                settings(None, Some("https://h/k"), None, Some("")),
                "t.keys_ca_file is empty",
            ),
        ] {
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].contains(want), "{want}: {problems:?}");
        }
    }
}
