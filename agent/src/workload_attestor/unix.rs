//! The `unix` workload attestor: selectors from the caller's kernel credentials and
//! `/proc/<pid>`.
//!
//! | selector | source |
//! |---|---|
//! | `unix:uid:<n>` | the caller's effective uid (`SO_PEERCRED`) |
//! | `unix:user:<name>` | `/etc/passwd` entry of that uid, if any |
//! | `unix:gid:<n>` | the caller's effective gid (`SO_PEERCRED`) |
//! | `unix:group:<name>` | `/etc/group` entry of that gid, if any |
//! | `unix:supplementary_gid:<n>` | each supplementary gid at connect time (`SO_PEERGROUPS`); for a caller known only by PID, the `Groups:` line of `/proc/<pid>/status` |
//! | `unix:path:<path>` | the target of `/proc/<pid>/exe` |
//! | `unix:sha256:<hex>` | SHA-256 of the running executable (opt-in) |
//!
//! Names come from plain `/etc/passwd` and `/etc/group` parsing (no NSS: no LDAP or
//! systemd-homed users). Each file is parsed once per version: a request costs one
//! `stat` of each, and a file whose inode, size, mtime or ctime changed is parsed again
//! ([`NameDb`]). A file changed less than [`SETTLE`] ago is parsed on every request until
//! it settles, so an edit within the file system's timestamp granularity (a few ms) of
//! the previous one cannot leave a stale name behind.
//!
//! The executable is hashed through `/proc/<pid>/exe`, which opens the inode the process
//! actually runs even if the path was replaced or deleted since. A deleted executable's
//! path reads as `<path> (deleted)`, which will not match an entry's `unix:path` (fail
//! closed).
//!
//! Reading `/proc/<pid>` by PID is only sound together with the pidfd liveness check the
//! Workload API does after attestation (see [`crate::workload_api::peer`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use carapace_core::Error as CoreError;
use carapace_core::Selector;
use carapace_core::plugin::{Caller, WorkloadAttestor};
use sha2::{Digest, Sha256};

/// The selector type and plugin name.
pub const NAME: &str = "unix";

/// Executables larger than this are not hashed (the `sha256` selector is then omitted,
/// so entries requiring it do not match).
pub const MAX_HASH_BYTES: u64 = 1 << 30;

/// Configuration of the `unix` workload attestor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnixAttestorConfig {
    /// Produce `unix:sha256:<hex>` of the caller's executable (costs a full read of the
    /// binary on every Workload API call).
    #[serde(default)]
    pub workload_sha256: bool,
}

/// How long after its last change a user or group database is trusted to stay as parsed
/// while its inode, size and timestamps stay the same (see [`NameDb`]).
pub const SETTLE: Duration = Duration::from_secs(2);

/// The `unix` workload attestor.
#[derive(Debug, Clone)]
pub struct UnixWorkloadAttestor {
    config: UnixAttestorConfig,
    passwd: Arc<NameDb>,
    group: Arc<NameDb>,
    proc_root: PathBuf,
}

impl UnixWorkloadAttestor {
    /// An attestor reading `/etc/passwd`, `/etc/group` and `/proc`.
    pub fn new(config: UnixAttestorConfig) -> Self {
        Self::with_databases(config, Path::new("/etc/passwd"), Path::new("/etc/group"))
    }

    /// As [`UnixWorkloadAttestor::new`] with other user and group databases (tests).
    fn with_databases(config: UnixAttestorConfig, passwd: &Path, group: &Path) -> Self {
        UnixWorkloadAttestor {
            config,
            passwd: Arc::new(NameDb::new(passwd)),
            group: Arc::new(NameDb::new(group)),
            proc_root: PathBuf::from("/proc"),
        }
    }

    fn attest_now(&self, caller: &Caller) -> Result<Vec<Selector>, CoreError> {
        let pid = caller.pid;
        if pid <= 0 {
            return Err(CoreError::WorkloadAttestation(format!(
                "caller PID {pid} cannot be inspected"
            )));
        }
        let proc_dir = self.proc_root.join(pid.to_string());
        let cannot = |what: &str, e: std::io::Error| {
            CoreError::WorkloadAttestation(format!("cannot read /proc/{pid}/{what}: {e}"))
        };
        let exe_path = std::fs::read_link(proc_dir.join("exe")).map_err(|e| cannot("exe", e))?;
        let read_groups;
        let groups: &[u32] = match &caller.groups {
            Some(groups) => groups,
            None => {
                let status = std::fs::read_to_string(proc_dir.join("status"))
                    .map_err(|e| cannot("status", e))?;
                read_groups = supplementary_groups(&status).ok_or_else(|| {
                    CoreError::WorkloadAttestation(format!(
                        "/proc/{pid}/status has no Groups: line"
                    ))
                })?;
                &read_groups
            }
        };

        let mut out = Vec::new();
        out.push(selector("uid", &caller.uid.to_string())?);
        if let Some(name) = self.passwd.name_of(caller.uid) {
            push_optional(&mut out, "user", &name);
        }
        out.push(selector("gid", &caller.gid.to_string())?);
        if let Some(name) = self.group.name_of(caller.gid) {
            push_optional(&mut out, "group", &name);
        }
        for gid in groups {
            out.push(selector("supplementary_gid", &gid.to_string())?);
        }
        match exe_path.to_str() {
            Some(p) => push_optional(&mut out, "path", p),
            None => tracing::debug!(pid, "executable path is not UTF-8; no unix:path selector"),
        }
        if self.config.workload_sha256 {
            let file = File::open(proc_dir.join("exe")).map_err(|e| cannot("exe", e))?;
            match sha256_bounded(file, MAX_HASH_BYTES).map_err(|e| cannot("exe", e))? {
                Some(hex) => out.push(selector("sha256", &hex)?),
                None => tracing::warn!(
                    pid,
                    limit = MAX_HASH_BYTES,
                    "executable is too large to hash; no unix:sha256 selector"
                ),
            }
        }
        Ok(out)
    }
}

impl super::blocking::BlockingAttestor for UnixWorkloadAttestor {
    fn name(&self) -> &str {
        NAME
    }
    fn attest_blocking(&self, caller: &Caller) -> Result<Vec<Selector>, CoreError> {
        self.attest_now(caller)
    }
}

#[async_trait::async_trait]
impl WorkloadAttestor for UnixWorkloadAttestor {
    fn name(&self) -> &str {
        NAME
    }

    async fn attest(&self, caller: &Caller) -> Result<Vec<Selector>, CoreError> {
        super::blocking::on_blocking_thread(self.clone(), caller.clone()).await
    }
}

fn selector(name: &str, arg: &str) -> Result<Selector, CoreError> {
    Selector::new(NAME, &format!("{name}:{arg}"))
}

/// Adds a selector built from data that may not form a valid one (names, paths): an
/// invalid one is skipped, which can only make fewer entries match.
fn push_optional(out: &mut Vec<Selector>, name: &str, arg: &str) {
    match selector(name, arg) {
        Ok(s) => out.push(s),
        Err(e) => tracing::debug!(error = %e, "skipping a unix selector"),
    }
}

/// The gids of the `Groups:` line of a `/proc/<pid>/status` file; `None` if the line is
/// missing or malformed.
fn supplementary_groups(status: &str) -> Option<Vec<u32>> {
    let line = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    line.split_whitespace()
        .map(|g| g.parse::<u32>().ok())
        .collect()
}

/// A passwd- or group-format file (`name:password:id:...`), parsed into names by id once
/// per version of the file.
///
/// A version is the file's device, inode, size, mtime and ctime: editors and `useradd`
/// replace the file (new inode) or rewrite it (new size or timestamps). A rewrite of the
/// same size within one tick of the file system's clock keeps the timestamps, so a
/// parse is kept only once the file has been unchanged for [`SETTLE`]; until then every
/// lookup parses the file again.
#[derive(Debug)]
pub(crate) struct NameDb {
    path: PathBuf,
    settle: Duration,
    parsed: Mutex<Option<Parsed>>,
}

#[derive(Debug)]
struct Parsed {
    version: FileVersion,
    names: HashMap<u32, Arc<str>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileVersion {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileVersion {
    fn of(m: &std::fs::Metadata) -> Self {
        FileVersion {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// Whether the file last changed at least `settle` before `now`.
    fn settled(&self, now: SystemTime, settle: Duration) -> bool {
        let (secs, nanos) = self.mtime.max(self.ctime);
        let last = u64::try_from(secs)
            .ok()
            .zip(u32::try_from(nanos).ok())
            .map(|(s, n)| SystemTime::UNIX_EPOCH + Duration::new(s, n));
        last.is_some_and(|last| now.duration_since(last).is_ok_and(|age| age >= settle))
    }
}

impl NameDb {
    pub(crate) fn new(path: &Path) -> Self {
        NameDb {
            path: path.to_path_buf(),
            settle: SETTLE,
            parsed: Mutex::new(None),
        }
    }

    /// The name of the first entry with id `id`; `None` if there is none or the file
    /// cannot be read.
    pub(crate) fn name_of(&self, id: u32) -> Option<Arc<str>> {
        let version = match std::fs::metadata(&self.path) {
            Ok(m) => FileVersion::of(&m),
            Err(_) => {
                *self.parsed.lock().unwrap_or_else(PoisonError::into_inner) = None;
                return None;
            }
        };
        let mut parsed = self.parsed.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = parsed.as_ref().filter(|p| p.version == version) {
            return p.names.get(&id).cloned();
        }
        let names = parse_names(&std::fs::read_to_string(&self.path).ok()?);
        let name = names.get(&id).cloned();
        // Kept only if the file did not change while it was read, and has settled.
        let unchanged = std::fs::metadata(&self.path).is_ok_and(|m| FileVersion::of(&m) == version);
        *parsed = (unchanged && version.settled(SystemTime::now(), self.settle))
            .then_some(Parsed { version, names });
        name
    }
}

/// Names by id of a passwd- or group-format text, the first entry of an id winning.
/// Comments, empty lines, NIS `+`/`-` lines and malformed lines are skipped.
fn parse_names(text: &str) -> HashMap<u32, Arc<str>> {
    let mut names = HashMap::new();
    for l in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(['+', '-']))
    {
        let mut fields = l.split(':');
        let (Some(name), Some(_password), Some(id)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if let (Ok(id), false) = (id.parse::<u32>(), name.is_empty()) {
            names.entry(id).or_insert_with(|| Arc::from(name));
        }
    }
    names
}

/// Hex SHA-256 of `reader`, read in 64 KiB blocks; `None` if longer than `limit` bytes.
fn sha256_bounded(reader: impl Read, limit: u64) -> std::io::Result<Option<String>> {
    let mut reader = reader.take(limit.saturating_add(1));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        total += n as u64;
        if total > limit {
            return Ok(None);
        }
        hasher.update(&buf[..n]);
    }
    Ok(Some(hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Caller {
        Caller::new(
            i32::try_from(std::process::id()).unwrap(),
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        )
    }

    fn values(sels: &[Selector], name: &str) -> Vec<String> {
        let prefix = format!("{name}:");
        sels.iter()
            .filter_map(|s| s.value().strip_prefix(&prefix).map(str::to_owned))
            .collect()
    }

    #[tokio::test]
    async fn attests_this_test_process() {
        let caller = me();
        let att = UnixWorkloadAttestor::new(UnixAttestorConfig::default());
        assert_eq!(att.name(), "unix");
        let sels = att.attest(&caller).await.unwrap();
        assert!(sels.iter().all(|s| s.kind() == "unix"));
        assert_eq!(values(&sels, "uid"), [caller.uid.to_string()]);
        assert_eq!(values(&sels, "gid"), [caller.gid.to_string()]);
        let exe = std::env::current_exe().unwrap();
        assert_eq!(values(&sels, "path"), [exe.to_str().unwrap().to_owned()]);
        assert!(values(&sels, "sha256").is_empty(), "sha256 is opt-in");
        // Supplementary groups are what the kernel reports for us.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let want: Vec<String> = supplementary_groups(&status)
            .unwrap()
            .iter()
            .map(u32::to_string)
            .collect();
        assert_eq!(values(&sels, "supplementary_gid"), want);
        // Names: whatever /etc/passwd says for our uid (root here).
        if let Some(name) = NameDb::new(Path::new("/etc/passwd")).name_of(caller.uid) {
            assert_eq!(values(&sels, "user"), [name.to_string()]);
        }
    }

    /// Groups the kernel gave with the connection are the ones used; `/proc` is read
    /// for them only when they were not given.
    #[tokio::test]
    async fn supplementary_groups_given_at_connect_are_used() {
        let att = UnixWorkloadAttestor::new(UnixAttestorConfig::default());
        let caller = me().with_groups(vec![70_001, 70_002]);
        let sels = att.attest(&caller).await.unwrap();
        assert_eq!(values(&sels, "supplementary_gid"), ["70001", "70002"]);
        let none = me().with_groups(Vec::new());
        let sels = att.attest(&none).await.unwrap();
        assert!(values(&sels, "supplementary_gid").is_empty());
    }

    /// Hashes the executable of a child process (`sleep`): the test binary itself is
    /// ~90 MB, which unoptimised sha2 takes seconds to hash.
    #[tokio::test]
    async fn sha256_of_the_executable_when_enabled() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let caller = Caller {
            pid: i32::try_from(child.id()).unwrap(),
            ..me()
        };
        let exe = std::fs::read_link(format!("/proc/{}/exe", caller.pid)).unwrap();
        let att = UnixWorkloadAttestor::new(UnixAttestorConfig {
            workload_sha256: true,
        });
        let sels = att.attest(&caller).await;
        child.kill().unwrap();
        child.wait().unwrap();
        let sels = sels.unwrap();
        let want = hex::encode(Sha256::digest(std::fs::read(&exe).unwrap()));
        assert_eq!(values(&sels, "sha256"), [want]);
        assert_eq!(values(&sels, "path"), [exe.to_str().unwrap().to_owned()]);
    }

    #[tokio::test]
    async fn names_come_from_the_databases_and_unknown_ids_have_none() {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        let group = dir.path().join("group");
        let caller = me();
        std::fs::write(
            &passwd,
            format!(
                "# comment\n+nis\nother:x:{}:0::/:/bin/sh\nalice:x:{}:{}::/home/alice:/bin/sh\n",
                caller.uid.wrapping_add(1),
                caller.uid,
                caller.gid
            ),
        )
        .unwrap();
        std::fs::write(&group, format!("staff:x:{}:alice\n", caller.gid)).unwrap();
        let att =
            UnixWorkloadAttestor::with_databases(UnixAttestorConfig::default(), &passwd, &group);
        let sels = att.attest(&caller).await.unwrap();
        assert_eq!(values(&sels, "user"), ["alice"]);
        assert_eq!(values(&sels, "group"), ["staff"]);

        std::fs::write(&passwd, "").unwrap();
        std::fs::write(&group, "").unwrap();
        let sels = att.attest(&caller).await.unwrap();
        assert!(values(&sels, "user").is_empty());
        assert!(values(&sels, "group").is_empty());
        assert_eq!(values(&sels, "uid"), [caller.uid.to_string()]);
    }

    fn db(path: &Path, settle: Duration) -> NameDb {
        NameDb {
            settle,
            ..NameDb::new(path)
        }
    }

    fn is_kept(db: &NameDb) -> bool {
        db.parsed.lock().unwrap().is_some()
    }

    #[test]
    fn a_settled_database_is_parsed_once_and_again_when_replaced_or_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        std::fs::write(
            &path,
            "alice:x:1000:1000::/:/bin/sh\nbob:x:1000:7::/:/bin/sh\n",
        )
        .unwrap();
        let db = db(&path, Duration::ZERO);
        assert_eq!(
            db.name_of(1000).as_deref(),
            Some("alice"),
            "the first entry wins"
        );
        assert!(is_kept(&db));
        assert_eq!(db.name_of(1001), None);
        // Replaced by rename (as useradd and vipw do): a new inode.
        let new = dir.path().join("passwd.new");
        std::fs::write(&new, "carol:x:1000:1000::/:/bin/sh\n").unwrap();
        std::fs::rename(&new, &path).unwrap();
        assert_eq!(db.name_of(1000).as_deref(), Some("carol"));
        // Rewritten in place with another size.
        std::fs::write(&path, "dave:x:1000:1000::/:/bin/sh\n").unwrap();
        assert_eq!(db.name_of(1000).as_deref(), Some("dave"));
        // Gone: no name, nothing kept.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(db.name_of(1000), None);
        assert!(!is_kept(&db));
    }

    #[test]
    fn a_database_changed_moments_ago_is_read_on_every_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("group");
        let db = db(&path, Duration::from_secs(3600));
        // Same size, rewritten in place within the same clock tick: the version (inode,
        // size, timestamps) may not change, so nothing may be kept.
        for name in ["aaaa", "bbbb", "cccc"] {
            std::fs::write(&path, format!("{name}:x:42:\n")).unwrap();
            assert_eq!(db.name_of(42).as_deref(), Some(name));
            assert!(!is_kept(&db));
        }
    }

    #[test]
    fn parsing_skips_comments_nis_and_malformed_lines() {
        let names =
            parse_names("# c\n\n+nis:x:1:\n-x:x:2:\n:x:3:\nbad:x:notanumber:\nshort\nok:x:4:\n");
        assert_eq!(names.len(), 1);
        assert_eq!(names.get(&4).map(|n| &**n), Some("ok"));
    }

    #[tokio::test]
    async fn a_process_that_cannot_be_inspected_is_an_error() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        child.wait().unwrap();
        let att = UnixWorkloadAttestor::new(UnixAttestorConfig::default());
        let caller = Caller::new(pid, 0, 0);
        let err = att.attest(&caller).await.unwrap_err();
        assert!(matches!(err, CoreError::WorkloadAttestation(_)), "{err}");
        let err = att.attest(&Caller::new(0, 0, 0)).await.unwrap_err();
        assert!(matches!(err, CoreError::WorkloadAttestation(_)), "{err}");
    }

    #[test]
    fn hashing_is_bounded() {
        let data = vec![7u8; 200_000];
        let full = sha256_bounded(&data[..], 200_000).unwrap().unwrap();
        assert_eq!(full, hex::encode(Sha256::digest(&data)));
        assert_eq!(sha256_bounded(&data[..], 199_999).unwrap(), None);
    }

    #[test]
    fn parses_groups_line() {
        assert_eq!(
            supplementary_groups("Name:\tx\nGroups:\t4 27 1000 \n"),
            Some(vec![4, 27, 1000])
        );
        assert_eq!(supplementary_groups("Groups:\t\n"), Some(vec![]));
        assert_eq!(supplementary_groups("Name:\tx\n"), None);
        assert_eq!(supplementary_groups("Groups:\tx\n"), None);
    }

    #[test]
    fn config_defaults_to_no_hash() {
        let c: UnixAttestorConfig = toml::from_str("").unwrap();
        assert!(!c.workload_sha256);
        let c: UnixAttestorConfig = toml::from_str("workload_sha256 = true").unwrap();
        assert!(c.workload_sha256);
        assert!(toml::from_str::<UnixAttestorConfig>("bogus = 1").is_err());
    }
}
