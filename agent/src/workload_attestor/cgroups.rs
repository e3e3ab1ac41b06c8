//! The `cgroups` and `systemd` workload attestors: selectors from the caller's cgroup
//! membership (`/proc/<pid>/cgroup`, parsed by [`super::proc_cgroup`]) and, for systemd units,
//! the invocation ID systemd stores on the unit's cgroup.
//!
//! `cgroups` selectors:
//!
//! | selector | when |
//! |---|---|
//! | `cgroups:path:<path>` | always: the cgroup v2 path (or v1 `name=systemd`, `pids`, `memory`, `cpu`) |
//! | `cgroups:container_id:<64 hex>` | Docker, containerd, CRI-O and Podman layouts |
//! | `cgroups:container_runtime:<docker\|containerd\|crio\|podman>` | when the layout names it |
//! | `cgroups:pod_uid:<uid>` | kubepods paths (kubelet's systemd and cgroupfs drivers) |
//! | `cgroups:qos_class:<guaranteed\|burstable\|besteffort>` | kubepods paths |
//!
//! `systemd` selectors:
//!
//! | selector | when |
//! |---|---|
//! | `systemd:unit:<name>` | the caller runs in a unit of the system manager (`web.service`) |
//! | `systemd:slice:<name>` | the slice directly containing that unit (`system.slice`) |
//! | `systemd:invocation_id:<32 hex>` | that unit's current run, from the `trusted.invocation_id` xattr of its cgroup |
//! | `systemd:user_unit:<name>`, `systemd:user_slice:<name>` | the same for units of a user's own manager (below `user@<uid>.service`) |
//!
//! What a workload cannot forge: its cgroup is chosen by whoever started it (systemd, a
//! container runtime, the kubelet); moving to another cgroup needs write access to that
//! cgroup's `cgroup.procs`, which the system manager keeps for root. The exception is a
//! systemd user manager's delegated subtree (`user@<uid>.service`), where that user can
//! create cgroups of any name: paths there yield no container or pod selectors, and their
//! units are reported as `user_unit`/`user_slice`, never as `unit`/`slice`. `trusted.*`
//! xattrs can only be set with CAP_SYS_ADMIN, so only the system manager's invocation IDs
//! are read.
//!
//! As everywhere in the Workload API, `/proc/<pid>` is read by number and is trusted only
//! because the caller's pidfd is checked afterwards (see [`crate::workload_api::peer`]).

use std::path::{Path, PathBuf};

use carapace_core::Error as CoreError;
use carapace_core::Selector;
use carapace_core::plugin::{Caller, WorkloadAttestor};

use super::proc_cgroup::{CgroupFacts, parse_proc_cgroup};

/// The `cgroups` plugin name and selector type.
pub const CGROUPS: &str = "cgroups";
/// The `systemd` plugin name and selector type.
pub const SYSTEMD: &str = "systemd";

/// The xattr systemd sets on a unit's cgroup to its invocation ID.
const INVOCATION_ID_XATTR: &str = "trusted.invocation_id";

/// Settings of `[workload_attestor.cgroups]` and `[workload_attestor.systemd]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupAttestorConfig {
    /// Where the cgroup file systems are mounted (default `/sys/fs/cgroup`); the systemd
    /// attestor reads invocation IDs below it.
    pub cgroup_root: Option<PathBuf>,
}

/// The `cgroups` or `systemd` workload attestor, or both in one
/// ([`CgroupWorkloadAttestor::both`]), which reads `/proc/<pid>/cgroup` once for both.
#[derive(Debug, Clone)]
pub struct CgroupWorkloadAttestor {
    /// Makes `cgroups:` selectors.
    cgroups: bool,
    /// Makes `systemd:` selectors.
    systemd: bool,
    proc_root: PathBuf,
    cgroup_root: PathBuf,
    invocation_xattr: &'static str,
}

impl CgroupWorkloadAttestor {
    /// The `cgroups` attestor.
    pub fn cgroups(cfg: &CgroupAttestorConfig) -> Self {
        Self::new(true, false, cfg)
    }

    /// The `systemd` attestor.
    pub fn systemd(cfg: &CgroupAttestorConfig) -> Self {
        Self::new(false, true, cfg)
    }

    /// Both, sharing one read of `/proc/<pid>/cgroup` per caller; `cfg` is the `systemd`
    /// attestor's (only it uses `cgroup_root`).
    pub fn both(cfg: &CgroupAttestorConfig) -> Self {
        Self::new(true, true, cfg)
    }

    fn new(cgroups: bool, systemd: bool, cfg: &CgroupAttestorConfig) -> Self {
        CgroupWorkloadAttestor {
            cgroups,
            systemd,
            proc_root: PathBuf::from("/proc"),
            cgroup_root: cfg
                .cgroup_root
                .clone()
                .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup")),
            invocation_xattr: INVOCATION_ID_XATTR,
        }
    }

    fn facts(&self, pid: i32) -> Result<CgroupFacts, CoreError> {
        if pid <= 0 {
            return Err(CoreError::WorkloadAttestation(format!(
                "caller PID {pid} cannot be inspected"
            )));
        }
        let file = self.proc_root.join(pid.to_string()).join("cgroup");
        let text = std::fs::read_to_string(&file).map_err(|e| {
            CoreError::WorkloadAttestation(format!("cannot read /proc/{pid}/cgroup: {e}"))
        })?;
        parse_proc_cgroup(&text)
            .map_err(|e| CoreError::WorkloadAttestation(format!("/proc/{pid}/cgroup: {e}")))
    }

    fn attest_now(&self, caller: &Caller) -> Result<Vec<Selector>, CoreError> {
        let facts = self.facts(caller.pid)?;
        let mut out = Vec::new();
        if self.cgroups {
            out.extend(cgroups_selectors(&facts));
        }
        if self.systemd {
            let invocation = match (&facts.systemd_unit, facts.user_delegated) {
                (Some(unit), false) => self.invocation_id(&facts.path, unit),
                _ => None,
            };
            out.extend(systemd_selectors(&facts, invocation.as_deref()));
        }
        Ok(out)
    }

    /// The invocation ID of `unit`, read from the xattr of its cgroup: the prefix of
    /// `path` that ends with the unit's component, under the unified hierarchy (cgroup
    /// v2 or hybrid) or else v1's `name=systemd` one.
    fn invocation_id(&self, path: &str, unit: &str) -> Option<String> {
        let unit_path = unit_cgroup(path, unit)?;
        let relative = unit_path.trim_start_matches('/');
        let candidates = [
            self.cgroup_root.join(relative),
            self.cgroup_root.join("unified").join(relative),
            self.cgroup_root.join("systemd").join(relative),
        ];
        candidates
            .iter()
            .find_map(|dir| read_invocation_id(dir, self.invocation_xattr))
    }
}

/// `path` cut after the component that is `unit`'s cgroup: the first one named `unit`
/// (or `_<unit>`, systemd's escape for names that would clash with cgroup files). The
/// parser reads the unit as the first component after the slices, as systemd does.
fn unit_cgroup(path: &str, unit: &str) -> Option<String> {
    let escaped = format!("_{unit}");
    let components: Vec<&str> = path.split('/').collect();
    let at = components
        .iter()
        .position(|c| *c == unit || *c == escaped)?;
    Some(components[..=at].join("/"))
}

/// A 128-bit invocation ID from xattr `name` of `dir`, as 32 lowercase hex digits:
/// systemd stores it as that text (older versions: 16 raw bytes).
fn read_invocation_id(dir: &Path, name: &str) -> Option<String> {
    let mut buf = [0u8; 64];
    let n = rustix::fs::getxattr(dir, name, &mut buf[..]).ok()?;
    let value = &buf[..n];
    let hex = match value.len() {
        32 if value
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) =>
        {
            String::from_utf8(value.to_vec()).ok()?
        }
        16 => hex::encode(value),
        _ => return None,
    };
    (hex != "0".repeat(32)).then_some(hex)
}

/// Adds `<kind>:<name>:<value>`; a value that cannot form a selector is skipped, which
/// can only make fewer entries match.
fn push(out: &mut Vec<Selector>, kind: &str, name: &str, value: &str) {
    match Selector::new(kind, &format!("{name}:{value}")) {
        Ok(s) => out.push(s),
        Err(e) => tracing::debug!(error = %e, "skipping a {kind} selector"),
    }
}

fn cgroups_selectors(f: &CgroupFacts) -> Vec<Selector> {
    let mut out = Vec::new();
    push(&mut out, CGROUPS, "path", &f.path);
    if let Some(id) = &f.container_id {
        push(&mut out, CGROUPS, "container_id", id);
    }
    if let Some(rt) = f.container_runtime {
        push(&mut out, CGROUPS, "container_runtime", rt);
    }
    if let Some(uid) = &f.pod_uid {
        push(&mut out, CGROUPS, "pod_uid", uid);
    }
    if let Some(qos) = f.qos_class {
        push(&mut out, CGROUPS, "qos_class", qos);
    }
    out
}

fn systemd_selectors(f: &CgroupFacts, invocation_id: Option<&str>) -> Vec<Selector> {
    let mut out = Vec::new();
    let (unit, slice) = if f.user_delegated {
        ("user_unit", "user_slice")
    } else {
        ("unit", "slice")
    };
    if let Some(u) = &f.systemd_unit {
        push(&mut out, SYSTEMD, unit, u);
    }
    if let Some(s) = &f.systemd_slice {
        push(&mut out, SYSTEMD, slice, s);
    }
    if let Some(id) = invocation_id {
        push(&mut out, SYSTEMD, "invocation_id", id);
    }
    out
}

impl super::blocking::BlockingAttestor for CgroupWorkloadAttestor {
    fn name(&self) -> &str {
        WorkloadAttestor::name(self)
    }
    fn attest_blocking(&self, caller: &Caller) -> Result<Vec<Selector>, CoreError> {
        self.attest_now(caller)
    }
}

#[async_trait::async_trait]
impl WorkloadAttestor for CgroupWorkloadAttestor {
    fn name(&self) -> &str {
        match (self.cgroups, self.systemd) {
            (true, true) => "cgroups+systemd",
            (true, false) => CGROUPS,
            _ => SYSTEMD,
        }
    }

    async fn attest(&self, caller: &Caller) -> Result<Vec<Selector>, CoreError> {
        super::blocking::on_blocking_thread(self.clone(), caller.clone()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[Selector]) -> Vec<String> {
        s.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn container_and_pod_facts_become_cgroups_selectors() {
        let f = parse_proc_cgroup(
            "0::/kubepods.slice/kubepods-burstable.slice/\
             kubepods-burstable-pod0f8a0d1e_9c1b_4b1e_8f3a_2b6c5d4e3f21.slice/\
             cri-containerd-4d3c2b1a0f9e8d7c6b5a49382716051f4e3d2c1b0a9f8e7d6c5b4a3928171605.scope\n",
        )
        .unwrap();
        let got = strings(&cgroups_selectors(&f));
        assert!(got.contains(&"cgroups:container_id:4d3c2b1a0f9e8d7c6b5a49382716051f4e3d2c1b0a9f8e7d6c5b4a3928171605".to_owned()), "{got:?}");
        assert!(
            got.contains(&"cgroups:pod_uid:0f8a0d1e-9c1b-4b1e-8f3a-2b6c5d4e3f21".to_owned()),
            "{got:?}"
        );
        assert!(
            got.contains(&"cgroups:qos_class:burstable".to_owned()),
            "{got:?}"
        );
        assert!(
            got.contains(&"cgroups:container_runtime:containerd".to_owned()),
            "{got:?}"
        );
        assert!(
            got[0].starts_with("cgroups:path:/kubepods.slice/"),
            "{got:?}"
        );
    }

    #[test]
    fn system_units_and_user_units_are_told_apart() {
        let system = parse_proc_cgroup("0::/system.slice/web.service\n").unwrap();
        assert_eq!(
            strings(&systemd_selectors(
                &system,
                Some("0123456789abcdef0123456789abcdef")
            )),
            [
                "systemd:unit:web.service",
                "systemd:slice:system.slice",
                "systemd:invocation_id:0123456789abcdef0123456789abcdef"
            ]
        );
        // A user's own manager: the user names its units, so they never read as system
        // units.
        let user = parse_proc_cgroup(
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/web.service\n",
        )
        .unwrap();
        assert_eq!(
            strings(&systemd_selectors(&user, None)),
            [
                "systemd:user_unit:web.service",
                "systemd:user_slice:app.slice"
            ]
        );
    }

    #[test]
    fn the_invocation_id_comes_from_the_units_cgroup_xattr() {
        let root = tempfile::tempdir().unwrap();
        let unit_dir = root.path().join("system.slice/web.service");
        std::fs::create_dir_all(unit_dir.join("sub")).unwrap();
        // Tests use a user.* xattr (settable without CAP_SYS_ADMIN) in place of
        // systemd's trusted.* one.
        rustix::fs::setxattr(
            &unit_dir,
            "user.invocation_id",
            b"0123456789abcdef0123456789abcdef",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        let a = CgroupWorkloadAttestor {
            invocation_xattr: "user.invocation_id",
            ..CgroupWorkloadAttestor::systemd(&CgroupAttestorConfig {
                cgroup_root: Some(root.path().to_owned()),
            })
        };
        // A process in a sub-cgroup of the unit gets the unit's ID.
        assert_eq!(
            a.invocation_id("/system.slice/web.service/sub", "web.service")
                .as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );
        // 16 raw bytes (older systemd) read as hex; anything else as nothing.
        rustix::fs::setxattr(
            &unit_dir,
            "user.invocation_id",
            &[0xab; 16],
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        assert_eq!(
            a.invocation_id("/system.slice/web.service", "web.service")
                .as_deref(),
            Some("abababababababababababababababab")
        );
        rustix::fs::setxattr(
            &unit_dir,
            "user.invocation_id",
            b"not an id",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        assert_eq!(
            a.invocation_id("/system.slice/web.service", "web.service"),
            None
        );
        assert_eq!(
            a.invocation_id("/system.slice/other.service", "other.service"),
            None
        );
    }

    #[tokio::test]
    async fn this_process_is_attested_from_its_own_cgroup_file() {
        let me = Caller::new(i32::try_from(std::process::id()).unwrap(), 0, 0);
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let facts = parse_proc_cgroup(&text).unwrap();
        let cfg = CgroupAttestorConfig::default();
        let got = strings(
            &CgroupWorkloadAttestor::cgroups(&cfg)
                .attest(&me)
                .await
                .unwrap(),
        );
        assert_eq!(got[0], format!("cgroups:path:{}", facts.path));
        // The systemd attestor works on any host, with or without systemd units.
        let systemd = strings(
            &CgroupWorkloadAttestor::systemd(&cfg)
                .attest(&me)
                .await
                .unwrap(),
        );
        // Both from one read: exactly the two sets together.
        let both = strings(
            &CgroupWorkloadAttestor::both(&cfg)
                .attest(&me)
                .await
                .unwrap(),
        );
        assert_eq!(both, [got.clone(), systemd].concat());
        // A PID that does not exist is an error, never an empty selector set.
        let gone = Caller {
            pid: i32::MAX,
            ..me.clone()
        };
        assert!(
            CgroupWorkloadAttestor::cgroups(&cfg)
                .attest(&gone)
                .await
                .is_err()
        );
    }
}
