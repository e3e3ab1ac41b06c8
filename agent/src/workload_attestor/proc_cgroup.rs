//! What a process's cgroup membership says about it: [`parse_proc_cgroup`] turns the
//! text of `/proc/<pid>/cgroup` (read by the caller) into [`CgroupFacts`], from which the
//! `cgroups` and `systemd` workload attestors make selectors. Pure: no I/O.
//!
//! # Trust
//!
//! A process's cgroup is chosen by whoever started it (systemd, a container runtime, the
//! kubelet). Moving a process to another cgroup, or creating one, needs write access to
//! the cgroup file system, which the system manager keeps for root, with one exception:
//! a *delegated* subtree, whose owner can create cgroups of any name below it and move its
//! own processes among them. Delegated subtrees are
//!
//! - a systemd user manager (`user@<uid>.service`): that user's whole tree. Paths with such
//!   a component set [`CgroupFacts::user_delegated`] and never yield container or pod facts;
//! - possibly anything *below* a unit or container cgroup (units with `Delegate=yes`,
//!   containers running systemd, crun's `container` sub-cgroup, Docker-in-Docker, ...):
//!   names there may be chosen by the unit's or container's own processes.
//!
//! Hence the rules here read a path the way systemd itself does (libsystemd's
//! `cg_path_get_unit`/`cg_path_get_user_unit` in `src/basic/cgroup-util.c`): a run of
//! slices from the root, then **the** unit; whatever lies below that unit belongs to it
//! and is never read as another unit, slice, container or pod. Container layouts are
//! matched on the last path component only (the one exception: crun's literal `container`
//! sub-cgroup, see below) and only where that component is the unit systemd placed in its
//! slices, or at the exact position of a cgroupfs layout anchored at the root. A workload
//! with a delegated subtree therefore cannot make its path look like another container's.
//!
//! The paths are those seen from the *reader's* cgroup namespace: the agent must run in
//! the host's cgroup namespace. Cgroups outside the reader's namespace show up as `..`
//! components, which are rejected.
//!
//! # The file
//!
//! Lines `hierarchy-ID:controller-list:path` (cgroups(7)). Rejected, with an `Err` naming
//! the line and the problem: empty input, a line without two `:`, a hierarchy ID that is
//! not a plain decimal number, the same ID or controller twice, hierarchy `0` (cgroup v2)
//! with controllers or not on the last line (the kernel always prints it last), any other
//! hierarchy without controllers, a path that does not start with `/`, is longer than
//! 4096 bytes, has empty, `.` or `..` components, control characters (NUL included) or
//! non-ASCII bytes, or ends in ` (deleted)` (the kernel's mark for a removed cgroup).
//! The kernel has refused `\n` in cgroup names since 2017 (backported to stable kernels),
//! so one name cannot fake a line; the duplicate and ordering checks are a second guard.
//!
//! # Which hierarchy
//!
//! - pure cgroup v2 (`0::` only, possibly with stray v1 controllers such as `1:net_cls:/`):
//!   the `0::` path;
//! - pure v1: `name=systemd`, else `pids`, else `memory`, else `cpu` (`cpu,cpuacct`);
//! - hybrid (both `0::` and `name=systemd`): the `name=systemd` path, unless it is a
//!   strict ancestor of the `0::` path (e.g. `/` when the hierarchy is mounted but
//!   unmanaged), in which case the `0::` path. systemd keeps the two equal for everything
//!   it manages, but container runtimes in cgroup v1 mode (cgroupfs driver) move processes
//!   in the v1 hierarchies only: a Docker container on Debian 10 / Ubuntu 20.04 reads
//!   `1:name=systemd:/docker/<id>` and `0::/system.slice/containerd.service`
//!   (docker/for-linux#1293). Taking `0::` there would report every container process as
//!   `containerd.service`. `user_delegated` is set if *either* path is delegated.
//!
//! # Layouts
//!
//! systemd-driver layouts (the unit after the leading slices, last component, or followed
//! only by crun's `container` sub-cgroup, which crun creates by default on cgroup v2:
//! `run.oci.systemd.subgroup` in crun(1), quoted in opencontainers/runc#2448):
//!
//! | unit | runtime | seen in |
//! |---|---|---|
//! | `docker-<id>.scope` | docker | docs.docker.com/engine/containers/runmetrics; under kubepods with dockershim: lxc/lxc#3890, kontena/pharos-cluster#440 |
//! | `cri-containerd-<id>.scope` | containerd | kubepods: netdata/netdata#4868, containerd/nri#227 (kind) |
//! | `crio-<id>.scope` | crio | opencontainers/runc#4620, kubernetes/minikube#11280; not `crio-conmon-<id>.scope` (the monitor) |
//! | `libpod-<id>.scope` | podman | `machine.slice`: podman#10602, falcosecurity/libs#1613 (`/container`); pods `machine-libpod_pod_<pod>.slice`: podman#9252; not `libpod-conmon-<id>.scope` |
//!
//! cgroupfs-driver layouts, the whole path:
//!
//! | path | runtime | seen in |
//! |---|---|---|
//! | `/docker/<id>` | docker | docs.docker.com runmetrics; docker/for-linux#1293 |
//! | `/libpod_parent/libpod-<id>` | podman | podman#3566, podman#14236 |
//! | `/kubepods[/burstable\|/besteffort]/pod<uid>/<id>` | unknown (`None`) | containers/crun#729; kubelet `ToCgroupfs` |
//! | `/kubepods[/burstable\|/besteffort]/pod<uid>/crio-<id>` | crio | cri-o/cri-o#812 (CRI-O names cgroupfs containers `crio-<id>`) |
//!
//! `<id>` is exactly 64 lowercase hex digits. Kubernetes (kubelet `pkg/kubelet/cm`:
//! `CgroupName.ToSystemd` escapes `-` in the pod UID as `_`, QoS classes `burstable` and
//! `besteffort` get their own level, guaranteed pods sit directly in the root) with the
//! systemd driver: `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/`
//! and `/kubepods.slice/kubepods-pod<uid>.slice/`, or kind's `--cgroup-root=/kubelet`
//! variant `/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-<qos>.slice/...`
//! (containerd/nri#227, kubernetes-sigs/kind#3947); the cgroupfs forms above. k3s and
//! OpenShift use these same kubelet layouts. Pod facts need the kubepods root as the first
//! component(s), QoS and pod levels that agree with each other (as systemd's slice naming
//! forces them to), a canonical UUID (static pods' 32-hex config hashes do not qualify:
//! they are not API pod UIDs), and a recognized container below; anything else yields no
//! pod facts (not an `Err`: the rest of the facts stay usable). Rootless Docker and
//! Podman live below `user@<uid>.service` (docker/docs#14545, podman#8588): no container
//! facts.

use std::collections::HashSet;

/// Longest path accepted (PATH_MAX).
const MAX_PATH_LEN: usize = 4096;
/// Most lines accepted: real kernels have well under 20 hierarchies.
const MAX_LINES: usize = 128;
/// Largest input accepted at all.
const MAX_INPUT_LEN: usize = 1 << 20;
/// systemd's longest unit name (UNIT_NAME_MAX without the NUL).
const UNIT_NAME_MAX: usize = 255;
/// Unit types that own cgroups with processes (slices are handled apart).
const UNIT_SUFFIXES: [&str; 5] = [".service", ".scope", ".socket", ".mount", ".swap"];
/// The kernel's mark on the path of a removed cgroup (cgroup v2).
const DELETED_MARK: &str = " (deleted)";
/// crun's default sub-cgroup below the scope it creates (`run.oci.systemd.subgroup`).
const CRUN_SUBGROUP: &str = "container";

/// What a process's cgroup membership says about it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CgroupFacts {
    /// The cgroup path used for everything below: the cgroup v2 unified path (the `0::`
    /// line) on pure v2 hosts; the `name=systemd` path on hybrid hosts unless that is a
    /// strict ancestor of the `0::` path; on pure v1 hosts the path of the `name=systemd`
    /// hierarchy, else of the `pids`, else `memory`, else `cpu`/`cpu,cpuacct` controller
    /// line.
    pub path: String,
    /// Whether `path` (or, on hybrid hosts, the other of `0::` and `name=systemd`) lies
    /// inside a systemd user manager's delegated subtree (a component
    /// `user@<uid>.service`): that user can create any cgroup names there.
    pub user_delegated: bool,
    /// A container's ID (64 lowercase hex), when the path has one of the known layouts
    /// (never set when `user_delegated`).
    pub container_id: Option<String>,
    /// Which layout matched: "docker", "containerd", "crio", "podman"; `None` when the
    /// layout does not tell (bare IDs under kubepods with the cgroupfs driver).
    pub container_runtime: Option<&'static str>,
    /// Kubernetes pod UID in canonical form (lowercase, dashes: 8-4-4-4-12), from
    /// kubepods paths (never set when `user_delegated`).
    pub pod_uid: Option<String>,
    /// Kubernetes QoS class from kubepods paths: "guaranteed", "burstable", "besteffort".
    pub qos_class: Option<&'static str>,
    /// The systemd unit the process belongs to, as systemd reads the path: the first
    /// component after the leading slices (`web.service`, `docker-<id>.scope`,
    /// `session-3.scope`). When that unit is `user@<uid>.service`, the unit of the user
    /// manager below it instead (`user_delegated` is then set). Components below the unit
    /// are the unit's own sub-cgroups and never count. `None` when the path does not
    /// follow systemd's layout, or when a `user@<uid>.service` component appears anywhere
    /// else than in that position.
    pub systemd_unit: Option<String>,
    /// The slice directly containing that unit (`system.slice`, `user-1000.slice`,
    /// `kubepods-burstable-pod<...>.slice`); `-.slice`, the manager's root slice, for a
    /// unit at the top of its manager's tree (`/init.scope`).
    pub systemd_slice: Option<String>,
}

/// Parses the contents of `/proc/<pid>/cgroup`.
pub fn parse_proc_cgroup(content: &str) -> Result<CgroupFacts, String> {
    let lines = parse_lines(content)?;
    let (path, other) = select_path(&lines)?;
    Ok(facts_for(path, other))
}

/// One validated line.
struct Line<'a> {
    id: u32,
    controllers: Vec<&'a str>,
    path: &'a str,
    components: Vec<&'a str>,
}

impl Line<'_> {
    fn has_controller(&self, name: &str) -> bool {
        self.controllers.contains(&name)
    }
}

fn parse_lines(content: &str) -> Result<Vec<Line<'_>>, String> {
    if content.is_empty() {
        return Err("empty cgroup file".to_owned());
    }
    if content.len() > MAX_INPUT_LEN {
        return Err(format!("cgroup file longer than {MAX_INPUT_LEN} bytes"));
    }
    let body = content.strip_suffix('\n').unwrap_or(content);
    let mut lines: Vec<Line<'_>> = Vec::new();
    let mut ids = HashSet::new();
    let mut controllers_seen = HashSet::new();
    for (index, text) in body.split('\n').enumerate() {
        let n = index + 1;
        if n > MAX_LINES {
            return Err(format!("more than {MAX_LINES} lines"));
        }
        let mut fields = text.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(format!("line {n}: expected hierarchy-ID:controllers:path"));
        };
        if lines.last().is_some_and(|l| l.id == 0) {
            return Err(format!(
                "line {n}: follows hierarchy 0, which the kernel always prints last"
            ));
        }
        let id = parse_hierarchy_id(id)
            .ok_or_else(|| format!("line {n}: the hierarchy ID is not a decimal number"))?;
        if !ids.insert(id) {
            return Err(format!("line {n}: hierarchy {id} is listed twice"));
        }
        let controllers =
            parse_controllers(id, controllers).map_err(|e| format!("line {n}: {e}"))?;
        for c in &controllers {
            if !controllers_seen.insert(*c) {
                return Err(format!("line {n}: a controller is listed twice"));
            }
        }
        let components = path_components(path).map_err(|e| format!("line {n}: {e}"))?;
        lines.push(Line {
            id,
            controllers,
            path,
            components,
        });
    }
    Ok(lines)
}

/// A hierarchy ID as the kernel prints it (`%d` of a non-negative number).
fn parse_hierarchy_id(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.len() > 1 && s.starts_with('0') {
        return None;
    }
    s.parse().ok()
}

/// The controller list of hierarchy `id`: empty for 0 (cgroup v2), otherwise
/// comma-separated controller names (`memory`, `net_cls`) and at most one `name=<name>`.
fn parse_controllers(id: u32, list: &str) -> Result<Vec<&str>, &'static str> {
    if id == 0 {
        return if list.is_empty() {
            Ok(Vec::new())
        } else {
            Err("hierarchy 0 (cgroup v2) must have an empty controller list")
        };
    }
    if list.is_empty() {
        return Err("a cgroup v1 hierarchy must name its controllers");
    }
    let mut out = Vec::new();
    for token in list.split(',') {
        let valid = match token.strip_prefix("name=") {
            Some(name) => {
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            }
            None => {
                !token.is_empty()
                    && token
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            }
        };
        if !valid {
            return Err("invalid controller list");
        }
        out.push(token);
    }
    Ok(out)
}

/// The components of a cgroup path (none for `/`), after the checks listed in the module
/// documentation.
fn path_components(path: &str) -> Result<Vec<&str>, &'static str> {
    if path.ends_with(DELETED_MARK) {
        return Err("the cgroup was removed (path ends in \" (deleted)\")");
    }
    if path.len() > MAX_PATH_LEN {
        return Err("path longer than 4096 bytes");
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err("path does not start with '/'");
    };
    for b in path.bytes() {
        if b < 0x20 || b == 0x7f {
            return Err("path contains a control character");
        }
        if !b.is_ascii() {
            return Err("path contains a non-ASCII byte");
        }
    }
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for c in rest.split('/') {
        match c {
            "" => return Err("path has an empty component"),
            "." | ".." => return Err("path has a '.' or '..' component"),
            _ => out.push(c),
        }
    }
    Ok(out)
}

/// The path facts are read from, and the other systemd-maintained path on hybrid hosts.
fn select_path<'a, 'b>(
    lines: &'b [Line<'a>],
) -> Result<(&'b Line<'a>, Option<&'b Line<'a>>), String> {
    let unified = lines.iter().find(|l| l.id == 0);
    let named = lines.iter().find(|l| l.has_controller("name=systemd"));
    match (named, unified) {
        (Some(named), Some(unified)) => {
            if is_strict_ancestor(named.path, unified.path) {
                Ok((unified, Some(named)))
            } else {
                Ok((named, Some(unified)))
            }
        }
        (Some(only), None) | (None, Some(only)) => Ok((only, None)),
        (None, None) => ["pids", "memory", "cpu"]
            .iter()
            .find_map(|c| lines.iter().find(|l| l.has_controller(c)))
            .map(|l| (l, None))
            .ok_or_else(|| {
                "no usable hierarchy: no 0::, name=systemd, pids, memory or cpu line".to_owned()
            }),
    }
}

/// Whether cgroup `a` strictly contains cgroup `b`.
fn is_strict_ancestor(a: &str, b: &str) -> bool {
    if a == b {
        return false;
    }
    a == "/" || b.strip_prefix(a).is_some_and(|rest| rest.starts_with('/'))
}

fn facts_for(line: &Line<'_>, other: Option<&Line<'_>>) -> CgroupFacts {
    let comps = line.components.as_slice();
    let user_delegated = comps.iter().any(|c| is_user_manager(c))
        || other.is_some_and(|o| o.components.iter().any(|c| is_user_manager(c)));
    let mut facts = CgroupFacts {
        path: line.path.to_owned(),
        user_delegated,
        ..CgroupFacts::default()
    };

    // The unit systemd (the system manager) placed the process in, and the position of
    // its component when it is a system-manager unit.
    let mut system_unit_at = None;
    if let Some(unit) = unit_after_slices(comps, 0) {
        if is_user_manager(comps[unit.index]) {
            // The user manager's own tree: its slices, then its unit.
            if let Some(user_unit) = unit_after_slices(comps, unit.index + 1) {
                facts.systemd_unit = Some(user_unit.name);
                facts.systemd_slice = Some(user_unit.slice);
            }
        } else if !user_delegated {
            facts.systemd_unit = Some(unit.name);
            facts.systemd_slice = Some(unit.slice);
            system_unit_at = Some(unit.index);
        }
        // else: a user@ component deeper down (a user manager inside some unit, e.g. a
        // container running systemd): no unit is reported at all.
    }
    if user_delegated {
        return facts;
    }

    let found = match system_unit_at {
        Some(at) => systemd_container(comps, at),
        None => cgroupfs_container(comps),
    };
    if let Some(c) = found {
        facts.container_id = Some(c.id.to_owned());
        facts.container_runtime = c.runtime;
        if let Some((uid, qos)) = c.pod {
            facts.pod_uid = Some(uid);
            facts.qos_class = Some(qos);
        }
    }
    facts
}

/// A unit found by [`unit_after_slices`].
struct UnitAt {
    index: usize,
    name: String,
    slice: String,
}

/// systemd's reading of `comps[start..]` (cg_path_get_unit): skip the leading slices,
/// then the next component must be a unit. The slice is the last one skipped, or the
/// manager's root slice `-.slice` when there was none.
fn unit_after_slices(comps: &[&str], start: usize) -> Option<UnitAt> {
    let mut slice = None;
    let mut i = start;
    while let Some(name) = comps.get(i).and_then(|c| slice_name(c)) {
        slice = Some(name);
        i += 1;
    }
    let name = unit_name(comps.get(i)?)?;
    Some(UnitAt {
        index: i,
        name: name.to_owned(),
        slice: slice.unwrap_or("-.slice").to_owned(),
    })
}

/// systemd escapes cgroup names that would clash with kernel file names by prefixing
/// `_` (cg_escape); this undoes it.
fn unescape(component: &str) -> &str {
    component.strip_prefix('_').unwrap_or(component)
}

/// Characters systemd allows in unit names (besides `@`, which is for instances).
fn is_unit_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'.' | b'-' | b'\\')
}

/// The unit name of a component, if it names a unit of a type with processes
/// (`name.service`, `name@instance.service`, ...). Slices are not units here.
fn unit_name(component: &str) -> Option<&str> {
    let name = unescape(component);
    if name.is_empty() || name.len() > UNIT_NAME_MAX {
        return None;
    }
    let stem = UNIT_SUFFIXES.iter().find_map(|s| name.strip_suffix(s))?;
    let (prefix, instance) = match stem.split_once('@') {
        Some((prefix, instance)) => (prefix, Some(instance)),
        None => (stem, None),
    };
    let chars_ok = |s: &str| s.bytes().all(is_unit_char);
    let ok = !prefix.is_empty()
        && chars_ok(prefix)
        && instance.is_none_or(|i| !i.is_empty() && chars_ok(i));
    ok.then_some(name)
}

/// The slice name of a component, if it names a valid slice other than the root slice
/// (which has no cgroup of its own).
fn slice_name(component: &str) -> Option<&str> {
    let name = unescape(component);
    if name.len() > UNIT_NAME_MAX {
        return None;
    }
    let stem = name.strip_suffix(".slice")?;
    let ok = !stem.is_empty()
        && stem.bytes().all(is_unit_char)
        && !stem.starts_with('-')
        && !stem.ends_with('-')
        && !stem.contains("--");
    ok.then_some(name)
}

/// `user@<uid>.service`: a systemd user manager, below which the user names everything.
fn is_user_manager(component: &str) -> bool {
    component
        .strip_prefix("user@")
        .and_then(|s| s.strip_suffix(".service"))
        .and_then(parse_hierarchy_id)
        .is_some()
}

/// A container found in a path.
struct Container<'a> {
    id: &'a str,
    runtime: Option<&'static str>,
    pod: Option<(String, &'static str)>,
}

/// 64 lowercase hex digits.
fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A container scope of a systemd-driver layout, as the unit at `comps[at]` that is the
/// last component or is followed only by crun's `container` sub-cgroup.
fn systemd_container<'a>(comps: &[&'a str], at: usize) -> Option<Container<'a>> {
    match &comps[at + 1..] {
        [] => {}
        [sub] if *sub == CRUN_SUBGROUP => {}
        _ => return None,
    }
    let stem = comps[at].strip_suffix(".scope")?;
    let (id, runtime) = [
        ("docker-", "docker"),
        ("cri-containerd-", "containerd"),
        ("crio-", "crio"),
        ("libpod-", "podman"),
    ]
    .iter()
    .find_map(|(prefix, runtime)| Some((stem.strip_prefix(prefix)?, *runtime)))?;
    // `crio-conmon-<id>` and `libpod-conmon-<id>` (the monitors) fail here.
    if !is_container_id(id) {
        return None;
    }
    Some(Container {
        id,
        runtime: Some(runtime),
        pod: kubepods_systemd(&comps[..at]),
    })
}

/// Pod UID and QoS class from the slices above a container scope, for the kubelet's
/// systemd driver: exactly the kubepods root, an optional QoS slice and the pod slice.
fn kubepods_systemd(slices: &[&str]) -> Option<(String, &'static str)> {
    let (root, rest) = match slices {
        ["kubepods.slice", rest @ ..] => ("kubepods", rest),
        ["kubelet.slice", "kubelet-kubepods.slice", rest @ ..] => ("kubelet-kubepods", rest),
        _ => return None,
    };
    let in_slice = |component: &str, parent: &str| -> Option<String> {
        let own = component.strip_suffix(".slice")?.strip_prefix(parent)?;
        own.strip_prefix('-').map(str::to_owned)
    };
    match rest {
        [pod] => {
            let uid = in_slice(pod, root)?;
            let uid = uid.strip_prefix("pod")?;
            Some((canonical_uid(uid, b'_')?, "guaranteed"))
        }
        [qos_slice, pod] => {
            let qos = qos_class(&in_slice(qos_slice, root)?)?;
            let uid = in_slice(pod, &format!("{root}-{qos}"))?;
            let uid = uid.strip_prefix("pod")?;
            Some((canonical_uid(uid, b'_')?, qos))
        }
        _ => None,
    }
}

fn qos_class(s: &str) -> Option<&'static str> {
    match s {
        "burstable" => Some("burstable"),
        "besteffort" => Some("besteffort"),
        _ => None,
    }
}

/// A pod UID written as 8-4-4-4-12 lowercase hex digits with `sep` between the groups,
/// in canonical form (with dashes).
fn canonical_uid(s: &str, sep: u8) -> Option<String> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let ok = b.iter().enumerate().all(|(i, &c)| match i {
        8 | 13 | 18 | 23 => c == sep,
        _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
    });
    ok.then(|| s.replace(char::from(sep), "-"))
}

/// The cgroupfs-driver layouts, matched on the whole path.
fn cgroupfs_container<'a>(comps: &[&'a str]) -> Option<Container<'a>> {
    match comps {
        ["docker", id] if is_container_id(id) => Some(Container {
            id,
            runtime: Some("docker"),
            pod: None,
        }),
        ["libpod_parent", name] => {
            let id = name
                .strip_prefix("libpod-")
                .filter(|id| is_container_id(id))?;
            Some(Container {
                id,
                runtime: Some("podman"),
                pod: None,
            })
        }
        ["kubepods", pod, name] => kubepods_cgroupfs(pod, "guaranteed", name),
        ["kubepods", qos, pod, name] => kubepods_cgroupfs(pod, qos_class(qos)?, name),
        _ => None,
    }
}

/// A container below `pod<uid>` in a kubelet cgroupfs layout: a bare ID (runtime
/// unknown: containerd and dockershim both use it) or CRI-O's `crio-<id>`.
fn kubepods_cgroupfs<'a>(pod: &str, qos: &'static str, name: &'a str) -> Option<Container<'a>> {
    let uid = pod.strip_prefix("pod").filter(|u| !u.is_empty())?;
    let (id, runtime) = match name.strip_prefix("crio-") {
        Some(id) => (id, Some("crio")),
        None => (name, None),
    };
    if !is_container_id(id) {
        return None;
    }
    Some(Container {
        id,
        runtime,
        pod: canonical_uid(uid, b'-').map(|uid| (uid, qos)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(content: &str) -> CgroupFacts {
        match parse_proc_cgroup(content) {
            Ok(f) => f,
            Err(e) => panic!("{content:?}: {e}"),
        }
    }

    fn err(content: &str) -> String {
        match parse_proc_cgroup(content) {
            Ok(f) => panic!("{content:?} parsed: {f:?}"),
            Err(e) => e,
        }
    }

    /// Expected facts, field by field.
    #[derive(Default)]
    struct Want {
        path: &'static str,
        user_delegated: bool,
        container_id: Option<&'static str>,
        container_runtime: Option<&'static str>,
        pod_uid: Option<&'static str>,
        qos_class: Option<&'static str>,
        systemd_unit: Option<&'static str>,
        systemd_slice: Option<&'static str>,
    }

    impl Want {
        fn facts(&self) -> CgroupFacts {
            CgroupFacts {
                path: self.path.to_owned(),
                user_delegated: self.user_delegated,
                container_id: self.container_id.map(str::to_owned),
                container_runtime: self.container_runtime,
                pod_uid: self.pod_uid.map(str::to_owned),
                qos_class: self.qos_class,
                systemd_unit: self.systemd_unit.map(str::to_owned),
                systemd_slice: self.systemd_slice.map(str::to_owned),
            }
        }
    }

    fn check(name: &str, content: &str, want: &Want) {
        assert_eq!(facts(content), want.facts(), "{name}");
    }

    // Container IDs and pod UIDs quoted from the sources cited in each case.
    const DOCKER_V1_ID: &str = "34048520ee4dcc79b692911aeb87c104e8f3d9b5a99aa269fa1f2b5a3fcfd1fd";
    const DOCKER_HYBRID_ID: &str =
        "a2ffe0e97ac22657a2a023ad628e9df837c38a03b1ebc904d3f6d644eb1a1a81";
    const DOCKER_DOCS_ID: &str = "ae836c95b4c3c9e9179e0e91015512da89fdec91612f63cebae57df9a5444c79";
    const NETDATA_POD: &str = "55c6c714-b240-4dec-9a45-57b61696ab6e";
    const NETDATA_CTR: &str = "2032491dcae31e6746f47daa0ac74564f2843a1bd847c5e6c4eb501ca132ac36";

    #[test]
    fn real_files_and_paths() {
        let cases: Vec<(&str, String, Want)> = vec![
            (
                // Docker, cgroupfs driver, pure v1: https://pastebin.com/DUXK3egY
                "docker cgroupfs v1",
                format!(
                    "11:devices:/docker/{i}\n10:cpuset:/docker/{i}\n9:perf_event:/docker/{i}\n\
                     8:freezer:/docker/{i}\n7:pids:/docker/{i}\n6:hugetlb:/docker/{i}\n\
                     5:blkio:/docker/{i}\n4:memory:/docker/{i}\n3:cpuacct,cpu:/docker/{i}\n\
                     2:net_prio,net_cls:/docker/{i}\n1:name=systemd:/docker/{i}\n",
                    i = DOCKER_V1_ID
                ),
                Want {
                    path: "/docker/34048520ee4dcc79b692911aeb87c104e8f3d9b5a99aa269fa1f2b5a3fcfd1fd",
                    container_id: Some(DOCKER_V1_ID),
                    container_runtime: Some("docker"),
                    ..Want::default()
                },
            ),
            (
                // Docker, cgroupfs driver, hybrid host (Debian 10 / Ubuntu 20.04): runc in
                // v1 mode leaves the unified hierarchy at containerd's own cgroup.
                // https://github.com/docker/for-linux/issues/1293
                "docker cgroupfs hybrid",
                format!(
                    "12:rdma:/\n11:perf_event:/docker/{i}\n10:freezer:/docker/{i}\n\
                     9:memory:/docker/{i}\n8:cpuset:/docker/{i}\n7:devices:/docker/{i}\n\
                     6:net_cls,net_prio:/docker/{i}\n5:hugetlb:/docker/{i}\n4:pids:/docker/{i}\n\
                     3:cpu,cpuacct:/docker/{i}\n2:blkio:/docker/{i}\n1:name=systemd:/docker/{i}\n\
                     0::/system.slice/containerd.service\n",
                    i = DOCKER_HYBRID_ID
                ),
                Want {
                    path: "/docker/a2ffe0e97ac22657a2a023ad628e9df837c38a03b1ebc904d3f6d644eb1a1a81",
                    container_id: Some(DOCKER_HYBRID_ID),
                    container_runtime: Some("docker"),
                    ..Want::default()
                },
            ),
            (
                // Docker, systemd driver, cgroup v2: layout and long ID from
                // https://docs.docker.com/engine/containers/runmetrics/
                "docker systemd v2",
                format!("0::/system.slice/docker-{DOCKER_DOCS_ID}.scope\n"),
                Want {
                    path: "/system.slice/docker-ae836c95b4c3c9e9179e0e91015512da89fdec91612f63cebae57df9a5444c79.scope",
                    container_id: Some(DOCKER_DOCS_ID),
                    container_runtime: Some("docker"),
                    systemd_unit: Some("docker-ae836c95b4c3c9e9179e0e91015512da89fdec91612f63cebae57df9a5444c79.scope"),
                    systemd_slice: Some("system.slice"),
                    ..Want::default()
                },
            ),
            (
                // containerd, kubelet systemd driver, burstable: systemd-cgls tree in
                // https://github.com/netdata/netdata/issues/4868
                "k8s containerd systemd burstable",
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/\
                     kubepods-burstable-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice/\
                     cri-containerd-{NETDATA_CTR}.scope\n"
                ),
                Want {
                    path: "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice/cri-containerd-2032491dcae31e6746f47daa0ac74564f2843a1bd847c5e6c4eb501ca132ac36.scope",
                    container_id: Some(NETDATA_CTR),
                    container_runtime: Some("containerd"),
                    pod_uid: Some(NETDATA_POD),
                    qos_class: Some("burstable"),
                    systemd_unit: Some("cri-containerd-2032491dcae31e6746f47daa0ac74564f2843a1bd847c5e6c4eb501ca132ac36.scope"),
                    systemd_slice: Some("kubepods-burstable-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice"),
                    ..Want::default()
                },
            ),
            (
                // Guaranteed pods sit directly in kubepods.slice (kubelet
                // pkg/kubelet/cm: qos_container_manager_linux.go, CgroupName.ToSystemd);
                // IDs from netdata/netdata#4868.
                "k8s containerd systemd guaranteed",
                format!(
                    "0::/kubepods.slice/kubepods-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice/\
                     cri-containerd-{NETDATA_CTR}.scope\n"
                ),
                Want {
                    path: "/kubepods.slice/kubepods-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice/cri-containerd-2032491dcae31e6746f47daa0ac74564f2843a1bd847c5e6c4eb501ca132ac36.scope",
                    container_id: Some(NETDATA_CTR),
                    container_runtime: Some("containerd"),
                    pod_uid: Some(NETDATA_POD),
                    qos_class: Some("guaranteed"),
                    systemd_unit: Some("cri-containerd-2032491dcae31e6746f47daa0ac74564f2843a1bd847c5e6c4eb501ca132ac36.scope"),
                    systemd_slice: Some("kubepods-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice"),
                    ..Want::default()
                },
            ),
            (
                // kind (kubelet --cgroup-root=/kubelet), containerd, besteffort:
                // https://github.com/containerd/nri/pull/227
                "kind containerd besteffort",
                "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
                 kubelet-kubepods-besteffort-pod1e597579_417e_482f_bf65_5fe170c3aebd.slice/\
                 cri-containerd-a09bc17f5aa29b0dbdec9ede5f46cf1396d2405917ab02e6f1eb1019f388396e.scope\n"
                    .to_owned(),
                Want {
                    path: "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod1e597579_417e_482f_bf65_5fe170c3aebd.slice/cri-containerd-a09bc17f5aa29b0dbdec9ede5f46cf1396d2405917ab02e6f1eb1019f388396e.scope",
                    container_id: Some("a09bc17f5aa29b0dbdec9ede5f46cf1396d2405917ab02e6f1eb1019f388396e"),
                    container_runtime: Some("containerd"),
                    pod_uid: Some("1e597579-417e-482f-bf65-5fe170c3aebd"),
                    qos_class: Some("besteffort"),
                    systemd_unit: Some("cri-containerd-a09bc17f5aa29b0dbdec9ede5f46cf1396d2405917ab02e6f1eb1019f388396e.scope"),
                    systemd_slice: Some("kubelet-kubepods-besteffort-pod1e597579_417e_482f_bf65_5fe170c3aebd.slice"),
                    ..Want::default()
                },
            ),
            (
                // Dockershim, systemd driver, v1: lines 12-7 of /proc/self/cgroup quoted in
                // https://github.com/lxc/lxc/issues/3890 (no name=systemd line quoted, so
                // the pids line is used).
                "k8s docker systemd v1 burstable",
                "12:rdma:/\n\
                 11:freezer:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7d4424e6_bb13_42f4_a47a_45a4828bf54d.slice/docker-d0b3604b67ac7930dd34ba3a796627e3e4717d12309e90a4afe3f38b6816ac98.scope\n\
                 10:pids:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7d4424e6_bb13_42f4_a47a_45a4828bf54d.slice/docker-d0b3604b67ac7930dd34ba3a796627e3e4717d12309e90a4afe3f38b6816ac98.scope\n\
                 9:blkio:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7d4424e6_bb13_42f4_a47a_45a4828bf54d.slice/docker-d0b3604b67ac7930dd34ba3a796627e3e4717d12309e90a4afe3f38b6816ac98.scope\n\
                 8:cpuset:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7d4424e6_bb13_42f4_a47a_45a4828bf54d.slice/docker-d0b3604b67ac7930dd34ba3a796627e3e4717d12309e90a4afe3f38b6816ac98.scope\n\
                 7:perf_event:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7d4424e6_bb13_42f4_a47a_45a4828bf54d.slice/docker-d0b3604b67ac7930dd34ba3a796627e3e4717d12309e90a4afe3f38b6816ac98.scope\n"
                    .to_owned(),
                Want {
                    path: "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7d4424e6_bb13_42f4_a47a_45a4828bf54d.slice/docker-d0b3604b67ac7930dd34ba3a796627e3e4717d12309e90a4afe3f38b6816ac98.scope",
                    container_id: Some("d0b3604b67ac7930dd34ba3a796627e3e4717d12309e90a4afe3f38b6816ac98"),
                    container_runtime: Some("docker"),
                    pod_uid: Some("7d4424e6-bb13-42f4-a47a-45a4828bf54d"),
                    qos_class: Some("burstable"),
                    systemd_unit: Some("docker-d0b3604b67ac7930dd34ba3a796627e3e4717d12309e90a4afe3f38b6816ac98.scope"),
                    systemd_slice: Some("kubepods-burstable-pod7d4424e6_bb13_42f4_a47a_45a4828bf54d.slice"),
                    ..Want::default()
                },
            ),
            (
                // CRI-O, systemd driver, v1 (the name=systemd path in the runc error):
                // https://github.com/opencontainers/runc/issues/4620
                "k8s crio systemd burstable",
                "1:name=systemd:/kubepods.slice/kubepods-burstable.slice/\
                 kubepods-burstable-poda5c1f8d5_1919_434d_add7_4afaafdaef89.slice/\
                 crio-5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c.scope\n"
                    .to_owned(),
                Want {
                    path: "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-poda5c1f8d5_1919_434d_add7_4afaafdaef89.slice/crio-5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c.scope",
                    container_id: Some("5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c"),
                    container_runtime: Some("crio"),
                    pod_uid: Some("a5c1f8d5-1919-434d-add7-4afaafdaef89"),
                    qos_class: Some("burstable"),
                    systemd_unit: Some("crio-5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c.scope"),
                    systemd_slice: Some("kubepods-burstable-poda5c1f8d5_1919_434d_add7_4afaafdaef89.slice"),
                    ..Want::default()
                },
            ),
            (
                // The same node's CRI-O monitor: a unit of the pod, but no container.
                // https://github.com/opencontainers/runc/issues/4620
                "crio-conmon is not a container",
                "0::/kubepods.slice/kubepods-burstable.slice/\
                 kubepods-burstable-pod207aaad1_659f_4db8_88e0_46e0cdcc3004.slice/\
                 crio-conmon-32da98c8522068be05a7510a3eddb09cad6ed2f03286180d0e931d0d0b6224a6.scope\n"
                    .to_owned(),
                Want {
                    path: "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod207aaad1_659f_4db8_88e0_46e0cdcc3004.slice/crio-conmon-32da98c8522068be05a7510a3eddb09cad6ed2f03286180d0e931d0d0b6224a6.scope",
                    systemd_unit: Some("crio-conmon-32da98c8522068be05a7510a3eddb09cad6ed2f03286180d0e931d0d0b6224a6.scope"),
                    systemd_slice: Some("kubepods-burstable-pod207aaad1_659f_4db8_88e0_46e0cdcc3004.slice"),
                    ..Want::default()
                },
            ),
            (
                // CRI-O besteffort (kube-proxy's sleep container), systemd-cgls in
                // https://github.com/kubernetes/minikube/issues/11280 (inside the node).
                "k8s crio systemd besteffort",
                "0::/kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-podae7a96fb_2bdc_46b0_96e2_78e4af94847b.slice/\
                 crio-89e8f450417b56acf3089925dfd8f050dd50e950e18cfe83ea923269df601102.scope\n"
                    .to_owned(),
                Want {
                    path: "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podae7a96fb_2bdc_46b0_96e2_78e4af94847b.slice/crio-89e8f450417b56acf3089925dfd8f050dd50e950e18cfe83ea923269df601102.scope",
                    container_id: Some("89e8f450417b56acf3089925dfd8f050dd50e950e18cfe83ea923269df601102"),
                    container_runtime: Some("crio"),
                    pod_uid: Some("ae7a96fb-2bdc-46b0-96e2-78e4af94847b"),
                    qos_class: Some("besteffort"),
                    systemd_unit: Some("crio-89e8f450417b56acf3089925dfd8f050dd50e950e18cfe83ea923269df601102.scope"),
                    systemd_slice: Some("kubepods-besteffort-podae7a96fb_2bdc_46b0_96e2_78e4af94847b.slice"),
                    ..Want::default()
                },
            ),
            (
                // kubelet cgroupfs driver, besteffort: the name=systemd cgroup root of a
                // pod's container in the mountinfo quoted in
                // https://github.com/containers/crun/issues/729
                "k8s cgroupfs besteffort",
                "1:name=systemd:/kubepods/besteffort/pod85401dd3-38cd-47b6-a90a-e16c0e1c06e6/\
                 dbc9f149296cec5d12b78385eb5b2c0cfe20b476f117c15c76d981cff44053c1\n"
                    .to_owned(),
                Want {
                    path: "/kubepods/besteffort/pod85401dd3-38cd-47b6-a90a-e16c0e1c06e6/dbc9f149296cec5d12b78385eb5b2c0cfe20b476f117c15c76d981cff44053c1",
                    container_id: Some("dbc9f149296cec5d12b78385eb5b2c0cfe20b476f117c15c76d981cff44053c1"),
                    pod_uid: Some("85401dd3-38cd-47b6-a90a-e16c0e1c06e6"),
                    qos_class: Some("besteffort"),
                    ..Want::default()
                },
            ),
            (
                // cgroupfs, guaranteed (no QoS level; kubelet CgroupName.ToCgroupfs) and a
                // CRI-O container (`crio-<id>`, cri-o/cri-o#812); pod UID from
                // google/cadvisor#2540, container ID from crun#729.
                "k8s cgroupfs guaranteed crio",
                "0::/kubepods/pod1ff47ee6-9685-4726-ac6f-0ff070c452d6/\
                 crio-dbc9f149296cec5d12b78385eb5b2c0cfe20b476f117c15c76d981cff44053c1\n"
                    .to_owned(),
                Want {
                    path: "/kubepods/pod1ff47ee6-9685-4726-ac6f-0ff070c452d6/crio-dbc9f149296cec5d12b78385eb5b2c0cfe20b476f117c15c76d981cff44053c1",
                    container_id: Some("dbc9f149296cec5d12b78385eb5b2c0cfe20b476f117c15c76d981cff44053c1"),
                    container_runtime: Some("crio"),
                    pod_uid: Some("1ff47ee6-9685-4726-ac6f-0ff070c452d6"),
                    qos_class: Some("guaranteed"),
                    ..Want::default()
                },
            ),
            (
                // Podman rootful, systemd manager, v1 host, container running systemd:
                // lines 12-1 of https://github.com/containers/podman/issues/10602. The
                // name=systemd path ends in the container's own init.scope: nothing below
                // a unit counts, so the unit is the libpod scope and no container is read.
                "podman rootful v1 with systemd inside",
                format!(
                    "12:pids:/machine.slice/libpod-{i}.scope\n11:memory:/machine.slice/libpod-{i}.scope\n\
                     10:blkio:/machine.slice/libpod-{i}.scope\n9:devices:/machine.slice/libpod-{i}.scope\n\
                     8:freezer:/machine.slice/libpod-{i}.scope\n7:rdma:/machine.slice/libpod-{i}.scope\n\
                     6:hugetlb:/machine.slice/libpod-{i}.scope\n5:cpu,cpuacct:/machine.slice/libpod-{i}.scope\n\
                     4:net_cls,net_prio:/machine.slice/libpod-{i}.scope\n3:cpuset:/machine.slice/libpod-{i}.scope\n\
                     2:perf_event:/machine.slice/libpod-{i}.scope\n\
                     1:name=systemd:/machine.slice/libpod-{i}.scope/init.scope\n",
                    i = "2521e906f0a0c758c3a7dc4fd68c197e32e96abb4b36807d0b0ede6d014a7c24"
                ),
                Want {
                    path: "/machine.slice/libpod-2521e906f0a0c758c3a7dc4fd68c197e32e96abb4b36807d0b0ede6d014a7c24.scope/init.scope",
                    systemd_unit: Some("libpod-2521e906f0a0c758c3a7dc4fd68c197e32e96abb4b36807d0b0ede6d014a7c24.scope"),
                    systemd_slice: Some("machine.slice"),
                    ..Want::default()
                },
            ),
            (
                // Podman rootful, v2, crun's `container` sub-cgroup: systemd-cgls in
                // https://github.com/falcosecurity/libs/pull/1613
                "podman rootful v2 crun subgroup",
                "0::/machine.slice/libpod-a2bc7b153f034b17f358cde43a7f8c7475147e8a0d1b2573c26473244ec44ce4.scope/container\n"
                    .to_owned(),
                Want {
                    path: "/machine.slice/libpod-a2bc7b153f034b17f358cde43a7f8c7475147e8a0d1b2573c26473244ec44ce4.scope/container",
                    container_id: Some("a2bc7b153f034b17f358cde43a7f8c7475147e8a0d1b2573c26473244ec44ce4"),
                    container_runtime: Some("podman"),
                    systemd_unit: Some("libpod-a2bc7b153f034b17f358cde43a7f8c7475147e8a0d1b2573c26473244ec44ce4.scope"),
                    systemd_slice: Some("machine.slice"),
                    ..Want::default()
                },
            ),
            (
                // ... and its monitor (same source): no container.
                "podman conmon",
                "0::/machine.slice/libpod-conmon-a2bc7b153f034b17f358cde43a7f8c7475147e8a0d1b2573c26473244ec44ce4.scope\n"
                    .to_owned(),
                Want {
                    path: "/machine.slice/libpod-conmon-a2bc7b153f034b17f358cde43a7f8c7475147e8a0d1b2573c26473244ec44ce4.scope",
                    systemd_unit: Some("libpod-conmon-a2bc7b153f034b17f358cde43a7f8c7475147e8a0d1b2573c26473244ec44ce4.scope"),
                    systemd_slice: Some("machine.slice"),
                    ..Want::default()
                },
            ),
            (
                // A podman pod's slice; path from
                // https://github.com/containers/podman/issues/9252 without the container's
                // own init.scope.
                "podman pod",
                "0::/machine.slice/machine-libpod_pod_4f8e36a5b9cc577a1b81592496579396e503d8126205bfa233ed26d651dce944.slice/\
                 libpod-3a5d6b2a4ffcb29587ddfb5f5edf7fc7a9ba51e0755d796b81b589ceab858d83.scope\n"
                    .to_owned(),
                Want {
                    path: "/machine.slice/machine-libpod_pod_4f8e36a5b9cc577a1b81592496579396e503d8126205bfa233ed26d651dce944.slice/libpod-3a5d6b2a4ffcb29587ddfb5f5edf7fc7a9ba51e0755d796b81b589ceab858d83.scope",
                    container_id: Some("3a5d6b2a4ffcb29587ddfb5f5edf7fc7a9ba51e0755d796b81b589ceab858d83"),
                    container_runtime: Some("podman"),
                    systemd_unit: Some("libpod-3a5d6b2a4ffcb29587ddfb5f5edf7fc7a9ba51e0755d796b81b589ceab858d83.scope"),
                    systemd_slice: Some("machine-libpod_pod_4f8e36a5b9cc577a1b81592496579396e503d8126205bfa233ed26d651dce944.slice"),
                    ..Want::default()
                },
            ),
            (
                // Podman, cgroupfs manager: https://github.com/containers/podman/issues/3566
                "podman cgroupfs",
                "0::/libpod_parent/libpod-a0cbe7ff2302118dff43f5715b7c22beb40393b53e40c81446f7997976184115\n"
                    .to_owned(),
                Want {
                    path: "/libpod_parent/libpod-a0cbe7ff2302118dff43f5715b7c22beb40393b53e40c81446f7997976184115",
                    container_id: Some("a0cbe7ff2302118dff43f5715b7c22beb40393b53e40c81446f7997976184115"),
                    container_runtime: Some("podman"),
                    ..Want::default()
                },
            ),
            (
                // Podman rootless: https://github.com/containers/podman/issues/8588
                "podman rootless",
                "0::/user.slice/user-1001.slice/user@1001.service/user.slice/\
                 libpod-2504b790675718f38df14eb544badb0ec8df966dc81298329067fa5e0eb6d27b.scope/container\n"
                    .to_owned(),
                Want {
                    path: "/user.slice/user-1001.slice/user@1001.service/user.slice/libpod-2504b790675718f38df14eb544badb0ec8df966dc81298329067fa5e0eb6d27b.scope/container",
                    user_delegated: true,
                    systemd_unit: Some("libpod-2504b790675718f38df14eb544badb0ec8df966dc81298329067fa5e0eb6d27b.scope"),
                    systemd_slice: Some("user.slice"),
                    ..Want::default()
                },
            ),
            (
                // Podman run by root from its own user manager (user@0.service): still
                // delegated, still no container. https://github.com/containers/podman/issues/20423
                "podman under user@0",
                "0::/user.slice/user-0.slice/user@0.service/machine.slice/\
                 libpod-cf21d19260ace8544fe8b769fc2638bf2c0873dfbfff0b6253f0569b26a1d5eb.scope/container\n"
                    .to_owned(),
                Want {
                    path: "/user.slice/user-0.slice/user@0.service/machine.slice/libpod-cf21d19260ace8544fe8b769fc2638bf2c0873dfbfff0b6253f0569b26a1d5eb.scope/container",
                    user_delegated: true,
                    systemd_unit: Some("libpod-cf21d19260ace8544fe8b769fc2638bf2c0873dfbfff0b6253f0569b26a1d5eb.scope"),
                    systemd_slice: Some("machine.slice"),
                    ..Want::default()
                },
            ),
            (
                // Docker rootless: layout from https://github.com/docker/docs/issues/14545
                "docker rootless",
                format!(
                    "0::/user.slice/user-1000.slice/user@1000.service/user.slice/docker-{DOCKER_DOCS_ID}.scope\n"
                ),
                Want {
                    path: "/user.slice/user-1000.slice/user@1000.service/user.slice/docker-ae836c95b4c3c9e9179e0e91015512da89fdec91612f63cebae57df9a5444c79.scope",
                    user_delegated: true,
                    systemd_unit: Some("docker-ae836c95b4c3c9e9179e0e91015512da89fdec91612f63cebae57df9a5444c79.scope"),
                    systemd_slice: Some("user.slice"),
                    ..Want::default()
                },
            ),
            (
                "system service",
                "0::/system.slice/nginx.service\n".to_owned(),
                Want {
                    path: "/system.slice/nginx.service",
                    systemd_unit: Some("nginx.service"),
                    systemd_slice: Some("system.slice"),
                    ..Want::default()
                },
            ),
            (
                // https://github.com/containers/podman/issues/11197
                "user session",
                "0::/user.slice/user-1002.slice/session-48.scope\n".to_owned(),
                Want {
                    path: "/user.slice/user-1002.slice/session-48.scope",
                    systemd_unit: Some("session-48.scope"),
                    systemd_slice: Some("user-1002.slice"),
                    ..Want::default()
                },
            ),
            (
                "user service",
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.service\n"
                    .to_owned(),
                Want {
                    path: "/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.service",
                    user_delegated: true,
                    systemd_unit: Some("app-foo.service"),
                    systemd_slice: Some("app.slice"),
                    ..Want::default()
                },
            ),
            (
                // A terminal's scope in a desktop session:
                // https://github.com/containers/podman/issues/20910
                "user scope in nested slices",
                "0::/user.slice/user-10000.slice/user@10000.service/app.slice/app-org.gnome.Terminal.slice/\
                 vte-spawn-f22f14d2-3d44-4304-9879-3fdd0df7b08e.scope\n"
                    .to_owned(),
                Want {
                    path: "/user.slice/user-10000.slice/user@10000.service/app.slice/app-org.gnome.Terminal.slice/vte-spawn-f22f14d2-3d44-4304-9879-3fdd0df7b08e.scope",
                    user_delegated: true,
                    systemd_unit: Some("vte-spawn-f22f14d2-3d44-4304-9879-3fdd0df7b08e.scope"),
                    systemd_slice: Some("app-org.gnome.Terminal.slice"),
                    ..Want::default()
                },
            ),
            (
                // The user manager's own process (init.scope at the top of its tree).
                "user manager itself",
                "0::/user.slice/user-1000.slice/user@1000.service/init.scope\n".to_owned(),
                Want {
                    path: "/user.slice/user-1000.slice/user@1000.service/init.scope",
                    user_delegated: true,
                    systemd_unit: Some("init.scope"),
                    systemd_slice: Some("-.slice"),
                    ..Want::default()
                },
            ),
            (
                // Hybrid, rootless podman on v1 moved the process below its terminal's
                // scope in name=systemd only (the whole file):
                // https://github.com/containers/podman/issues/6734
                "hybrid, name=systemd deeper",
                "12:hugetlb:/\n11:freezer:/\n10:blkio:/user.slice\n9:cpu,cpuacct:/user.slice\n\
                 8:perf_event:/\n7:memory:/user.slice/user-1000.slice/user@1000.service\n6:cpuset:/\n\
                 5:pids:/user.slice/user-1000.slice/user@1000.service\n4:devices:/user.slice\n3:rdma:/\n\
                 2:net_cls,net_prio:/\n\
                 1:name=systemd:/user.slice/user-1000.slice/user@1000.service/apps.slice/apps-org.gnome.Terminal.slice/vte-spawn-6773d329-9ee1-450e-ae44-d5e4810e64a2.scope/ef312c6459eb19dc7f99f918f0eb90c7a231c59f50e40e9141018baa13c48b35\n\
                 0::/user.slice/user-1000.slice/user@1000.service/apps.slice/apps-org.gnome.Terminal.slice/vte-spawn-6773d329-9ee1-450e-ae44-d5e4810e64a2.scope\n"
                    .to_owned(),
                Want {
                    path: "/user.slice/user-1000.slice/user@1000.service/apps.slice/apps-org.gnome.Terminal.slice/vte-spawn-6773d329-9ee1-450e-ae44-d5e4810e64a2.scope/ef312c6459eb19dc7f99f918f0eb90c7a231c59f50e40e9141018baa13c48b35",
                    user_delegated: true,
                    systemd_unit: Some("vte-spawn-6773d329-9ee1-450e-ae44-d5e4810e64a2.scope"),
                    systemd_slice: Some("apps-org.gnome.Terminal.slice"),
                    ..Want::default()
                },
            ),
            (
                // Hybrid with the name=systemd hierarchy at the root (mounted, unmanaged):
                // the 0:: path is used. This machine's own file has this shape.
                "hybrid, name=systemd at the root",
                "2:pids:/\n1:name=systemd:/\n0::/system.slice/nginx.service\n".to_owned(),
                Want {
                    path: "/system.slice/nginx.service",
                    systemd_unit: Some("nginx.service"),
                    systemd_slice: Some("system.slice"),
                    ..Want::default()
                },
            ),
            (
                // v2 with a stray v1 controller: https://github.com/coder/clistat/issues/25
                "v2 root with a v1 controller",
                "1:net_cls:/\n0::/\n".to_owned(),
                Want {
                    path: "/",
                    ..Want::default()
                },
            ),
            (
                // systemd's own process (systemd.special(7): init.scope in -.slice).
                "init",
                "0::/init.scope\n".to_owned(),
                Want {
                    path: "/init.scope",
                    systemd_unit: Some("init.scope"),
                    systemd_slice: Some("-.slice"),
                    ..Want::default()
                },
            ),
            (
                "root",
                "0::/\n".to_owned(),
                Want {
                    path: "/",
                    ..Want::default()
                },
            ),
            (
                // The kubelet moved itself into the slice (--kubelet-cgroups=/system.slice),
                // v1, the whole file: https://github.com/kontena/pharos-cluster/issues/440
                "process directly in a slice",
                "11:cpuacct,cpu:/system.slice\n10:perf_event:/system.slice\n9:pids:/system.slice\n\
                 8:devices:/system.slice\n7:blkio:/system.slice\n6:memory:/system.slice\n\
                 5:cpuset:/system.slice\n4:net_prio,net_cls:/system.slice\n3:hugetlb:/system.slice\n\
                 2:freezer:/system.slice\n1:name=systemd:/system.slice\n"
                    .to_owned(),
                Want {
                    path: "/system.slice",
                    ..Want::default()
                },
            ),
            (
                // kube-proxy created a sub-cgroup below its container's scope (systemd-cgls
                // in kontena/pharos-cluster#440): the unit is the scope, and nothing below
                // a container scope is read as a container.
                "sub-cgroup below a container scope",
                "0::/kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-pod9692aa0e_748e_11e8_8dfa_76d458035df6.slice/\
                 docker-abddff03dfd7710c79a750ce3e730365cbb2c8247a974170c1062683bc3e9152.scope/kube-proxy\n"
                    .to_owned(),
                Want {
                    path: "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod9692aa0e_748e_11e8_8dfa_76d458035df6.slice/docker-abddff03dfd7710c79a750ce3e730365cbb2c8247a974170c1062683bc3e9152.scope/kube-proxy",
                    systemd_unit: Some("docker-abddff03dfd7710c79a750ce3e730365cbb2c8247a974170c1062683bc3e9152.scope"),
                    systemd_slice: Some("kubepods-besteffort-pod9692aa0e_748e_11e8_8dfa_76d458035df6.slice"),
                    ..Want::default()
                },
            ),
            (
                // containerd's systemd cgroup syntax used as a cgroupfs name, a real
                // misconfiguration: https://github.com/elastic/apm-agent-nodejs/issues/3550
                "runc systemd syntax as a cgroupfs name",
                "1:name=systemd:/system.slice/containerd.service/\
                 kubepods-burstable-podff49d0be_16b7_4a49_bb9e_8ec1f1f4e27f.slice:cri-containerd:\
                 0f99ad5f45163ed14ab8eaf92ed34bb4a631d007f8755a7d79be614bcb0df0ef\n"
                    .to_owned(),
                Want {
                    path: "/system.slice/containerd.service/kubepods-burstable-podff49d0be_16b7_4a49_bb9e_8ec1f1f4e27f.slice:cri-containerd:0f99ad5f45163ed14ab8eaf92ed34bb4a631d007f8755a7d79be614bcb0df0ef",
                    systemd_unit: Some("containerd.service"),
                    systemd_slice: Some("system.slice"),
                    ..Want::default()
                },
            ),
            (
                // Static pods' UIDs are 32-hex config hashes, not API UIDs: container but
                // no pod facts. netdata/netdata#4868.
                "static pod",
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8daa50c3a64c9ff60bb9eab7b44b56fd.slice/\
                 cri-containerd-2884d57c0e100d7a9a2f9487ce0bc2986bca3430e988af7a4865aff061f51ac5.scope\n"
                    .to_owned(),
                Want {
                    path: "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8daa50c3a64c9ff60bb9eab7b44b56fd.slice/cri-containerd-2884d57c0e100d7a9a2f9487ce0bc2986bca3430e988af7a4865aff061f51ac5.scope",
                    container_id: Some("2884d57c0e100d7a9a2f9487ce0bc2986bca3430e988af7a4865aff061f51ac5"),
                    container_runtime: Some("containerd"),
                    systemd_unit: Some("cri-containerd-2884d57c0e100d7a9a2f9487ce0bc2986bca3430e988af7a4865aff061f51ac5.scope"),
                    systemd_slice: Some("kubepods-burstable-pod8daa50c3a64c9ff60bb9eab7b44b56fd.slice"),
                    ..Want::default()
                },
            ),
        ];
        for (name, content, want) in &cases {
            check(name, content, want);
            // The trailing newline is optional.
            check(name, content.trim_end_matches('\n'), want);
        }
    }

    /// A container scope path with `id` in the given template.
    fn scope(template: &str, id: &str) -> String {
        template.replace("{id}", id)
    }

    #[test]
    fn container_ids_must_be_exactly_64_lowercase_hex() {
        let templates = [
            "0::/system.slice/docker-{id}.scope",
            "0::/machine.slice/libpod-{id}.scope",
            "0::/kubepods.slice/kubepods-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice/cri-containerd-{id}.scope",
            "0::/kubepods.slice/kubepods-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice/crio-{id}.scope",
            "0::/docker/{id}",
            "0::/libpod_parent/libpod-{id}",
            "0::/kubepods/burstable/pod85401dd3-38cd-47b6-a90a-e16c0e1c06e6/{id}",
            "0::/kubepods/burstable/pod85401dd3-38cd-47b6-a90a-e16c0e1c06e6/crio-{id}",
        ];
        let bad_ids = [
            NETDATA_CTR[..63].to_owned(),
            format!("{NETDATA_CTR}0"),
            NETDATA_CTR.to_uppercase(),
            format!("{}g", &NETDATA_CTR[..63]),
            NETDATA_CTR[..12].to_owned(),
        ];
        for t in templates {
            let good = facts(&scope(t, NETDATA_CTR));
            assert_eq!(good.container_id.as_deref(), Some(NETDATA_CTR), "{t}");
            for id in &bad_ids {
                let f = facts(&scope(t, id));
                assert_eq!(f.container_id, None, "{t} {id}");
                assert_eq!(f.container_runtime, None, "{t} {id}");
                assert_eq!(f.pod_uid, None, "{t} {id}");
                assert_eq!(f.qos_class, None, "{t} {id}");
            }
        }
    }

    #[test]
    fn delegated_subtrees_yield_no_container_or_pod() {
        // Rootful-looking names inside a user manager: the user made them.
        for path in [
            format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/docker-{NETDATA_CTR}.scope"
            ),
            format!("/user.slice/user-1000.slice/user@1000.service/docker/{NETDATA_CTR}"),
            format!(
                "/user.slice/user-1000.slice/user@1000.service/kubepods.slice/\
                 kubepods-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice/cri-containerd-{NETDATA_CTR}.scope"
            ),
        ] {
            let f = facts(&format!("0::{path}\n"));
            assert!(f.user_delegated, "{path}");
            assert_eq!(
                (f.container_id, f.pod_uid, f.qos_class),
                (None, None, None),
                "{path}"
            );
        }

        // Below any unit, names are the unit's own: nothing there reads as a container,
        // pod or unit, whatever its shape.
        let nested = [
            // Docker-in-Docker, systemd driver outside, cgroupfs inside.
            format!("/system.slice/docker-{DOCKER_DOCS_ID}.scope/docker/{NETDATA_CTR}"),
            // A container pretending to hold another container's scope.
            format!("/system.slice/docker-{DOCKER_DOCS_ID}.scope/docker-{NETDATA_CTR}.scope"),
            // A Delegate=yes service building a kubepods tree of its own.
            format!(
                "/system.slice/evil.service/kubepods.slice/\
                 kubepods-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice/cri-containerd-{NETDATA_CTR}.scope"
            ),
            format!(
                "/system.slice/evil.service/kubepods/pod55c6c714-b240-4dec-9a45-57b61696ab6e/{NETDATA_CTR}"
            ),
        ];
        for path in &nested {
            let f = facts(&format!("0::{path}\n"));
            assert!(!f.user_delegated, "{path}");
            assert_eq!((f.container_id, f.pod_uid), (None, None), "{path}");
            let first_unit = path.split('/').nth(2).unwrap();
            assert_eq!(f.systemd_unit.as_deref(), Some(first_unit), "{path}");
            assert_eq!(f.systemd_slice.as_deref(), Some("system.slice"), "{path}");
        }

        // cgroupfs layouts are anchored at the root: nested copies do not match.
        for path in [
            format!("/docker/{DOCKER_DOCS_ID}/docker/{NETDATA_CTR}"),
            format!("/foo/docker/{NETDATA_CTR}"),
            format!("/libpod_parent/libpod-{DOCKER_DOCS_ID}/libpod-{NETDATA_CTR}"),
            format!("/other/kubepods/pod55c6c714-b240-4dec-9a45-57b61696ab6e/{NETDATA_CTR}"),
            format!("/kubepods/burstable/pod55c6c714-b240-4dec-9a45-57b61696ab6e/{NETDATA_CTR}/x"),
        ] {
            let f = facts(&format!("0::{path}\n"));
            assert_eq!(f.container_id, None, "{path}");
            assert_eq!(f.systemd_unit, None, "{path}");
        }

        // A user manager nested inside a unit (systemd running in a container): flagged,
        // and no unit of either manager is reported.
        let f = facts(&format!(
            "0::/system.slice/docker-{DOCKER_DOCS_ID}.scope/user.slice/user-1000.slice/\
             user@1000.service/app.slice/web.service\n"
        ));
        assert!(f.user_delegated);
        assert_eq!(
            (f.systemd_unit, f.systemd_slice, f.container_id),
            (None, None, None)
        );

        // A process directly in user@<uid>.service's cgroup (v1 allows it): delegated,
        // and no unit, since the user manager has no unit there.
        let f = facts("1:name=systemd:/user.slice/user-1000.slice/user@1000.service\n");
        assert!(f.user_delegated);
        assert_eq!(f.systemd_unit, None);
    }

    #[test]
    fn the_crun_subgroup_is_the_only_component_looked_through() {
        let base = format!("/machine.slice/libpod-{NETDATA_CTR}.scope");
        assert_eq!(
            facts(&format!("0::{base}/container\n"))
                .container_id
                .as_deref(),
            Some(NETDATA_CTR)
        );
        for tail in [
            "init.scope",
            "container/x",
            "containers",
            "Container",
            "payload",
        ] {
            let f = facts(&format!("0::{base}/{tail}\n"));
            assert_eq!(f.container_id, None, "{tail}");
            assert_eq!(
                f.systemd_unit.as_deref(),
                Some(&base["/machine.slice/".len()..]),
                "{tail}"
            );
        }
    }

    #[test]
    fn pod_facts_need_a_consistent_kubepods_layout() {
        let ctr = format!("cri-containerd-{NETDATA_CTR}.scope");
        let uid = "55c6c714_b240_4dec_9a45_57b61696ab6e";
        // Each path still has a container scope; none has pod facts.
        for slices in [
            // QoS slice and pod slice disagree.
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod{uid}.slice"),
            // A guaranteed pod's slice under a QoS slice, and a QoS pod directly in the root.
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-pod{uid}.slice"),
            format!("kubepods.slice/kubepods-burstable-pod{uid}.slice"),
            // Unknown QoS class.
            format!("kubepods.slice/kubepods-gold.slice/kubepods-gold-pod{uid}.slice"),
            // Not at the root.
            format!("system.slice/kubepods.slice/kubepods-pod{uid}.slice"),
            format!("kubelet.slice/kubepods.slice/kubepods-pod{uid}.slice"),
            // An extra level.
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-extra.slice/kubepods-burstable-pod{uid}.slice"
            ),
            // Malformed UIDs: dashes (systemd would read them as levels), upper case,
            // wrong group lengths, too short, not hex, missing.
            "kubepods.slice/kubepods-pod55c6c714-b240-4dec-9a45-57b61696ab6e.slice".to_owned(),
            "kubepods.slice/kubepods-pod55C6C714_B240_4DEC_9A45_57B61696AB6E.slice".to_owned(),
            "kubepods.slice/kubepods-pod55c6c714b_240_4dec_9a45_57b61696ab6e.slice".to_owned(),
            "kubepods.slice/kubepods-pod55c6c714_b240_4dec_9a45_57b61696ab6.slice".to_owned(),
            "kubepods.slice/kubepods-pod55c6c714_b240_4dec_9a45_57b61696abzz.slice".to_owned(),
            "kubepods.slice/kubepods-pod.slice".to_owned(),
        ] {
            let f = facts(&format!("0::/{slices}/{ctr}\n"));
            assert_eq!(f.container_id.as_deref(), Some(NETDATA_CTR), "{slices}");
            assert_eq!((f.pod_uid, f.qos_class), (None, None), "{slices}");
        }
        // The cgroupfs layout likewise.
        for dirs in [
            "kubepods/gold/pod55c6c714-b240-4dec-9a45-57b61696ab6e",
            "kubepods/pod55c6c714_b240_4dec_9a45_57b61696ab6e",
            "kubepods/pod55C6C714-B240-4DEC-9A45-57B61696AB6E",
            "kubepods/burstable/pod8daa50c3a64c9ff60bb9eab7b44b56fd",
        ] {
            let f = facts(&format!("0::/{dirs}/{NETDATA_CTR}\n"));
            assert_eq!((f.pod_uid, f.qos_class), (None, None), "{dirs}");
        }
        // No container, no pod facts: the pod slice itself, and conmon.
        let f = facts(&format!("0::/kubepods/burstable/pod{NETDATA_POD}\n"));
        assert_eq!((f.container_id, f.pod_uid), (None, None));
        let f = facts(&format!(
            "0::/kubepods.slice/kubepods-pod{uid}.slice/crio-conmon-{NETDATA_CTR}.scope\n"
        ));
        assert_eq!((f.container_id, f.pod_uid), (None, None));
    }

    #[test]
    fn systemd_names_are_read_as_systemd_reads_them() {
        let cases = [
            // Socket, mount and swap units, and instances.
            (
                "/system.slice/sshd.socket",
                Some("sshd.socket"),
                Some("system.slice"),
            ),
            (
                "/system.slice/boot.mount",
                Some("boot.mount"),
                Some("system.slice"),
            ),
            (
                "/system.slice/dev-sda2.swap",
                Some("dev-sda2.swap"),
                Some("system.slice"),
            ),
            (
                "/system.slice/system-getty.slice/getty@tty1.service",
                Some("getty@tty1.service"),
                Some("system-getty.slice"),
            ),
            // A unit at the root of the tree is in the root slice.
            ("/web.service", Some("web.service"), Some("-.slice")),
            // cg_escape's `_` prefix is undone.
            (
                "/system.slice/_cpu.service",
                Some("cpu.service"),
                Some("system.slice"),
            ),
            // Found by the property test: any leading `_` is undone, as cg_unescape does,
            // even where cg_escape would not have added one.
            (
                "/system.slice/_ocker-ae83.scope",
                Some("ocker-ae83.scope"),
                Some("system.slice"),
            ),
            // Not units: no suffix, types without processes, templates, bad characters,
            // bad slices in front.
            ("/system.slice/nginx", None, None),
            ("/system.slice/multi-user.target", None, None),
            ("/system.slice/getty@.service", None, None),
            ("/system.slice/@tty1.service", None, None),
            ("/system.slice/a b.service", None, None),
            ("/system.slice/a@b@c.service", None, None),
            ("/system.slice/.service", None, None),
            ("/-.slice/web.service", None, None),
            ("/sys--tem.slice/web.service", None, None),
            ("/system-.slice/web.service", None, None),
            ("/user.slice/user-1000.slice", None, None),
        ];
        for (path, unit, slice) in cases {
            let f = facts(&format!("0::{path}\n"));
            assert_eq!(f.systemd_unit.as_deref(), unit, "{path}");
            assert_eq!(f.systemd_slice.as_deref(), slice, "{path}");
            assert!(!f.user_delegated, "{path}");
        }
        // Unit names are at most 255 characters.
        let long = format!("/system.slice/{}.service", "a".repeat(247));
        assert_eq!(
            facts(&format!("0::{long}\n")).systemd_unit.as_deref(),
            Some(&long[14..])
        );
        let too_long = format!("/system.slice/{}.service", "a".repeat(248));
        assert_eq!(facts(&format!("0::{too_long}\n")).systemd_unit, None);
        // Only user@<number>.service is a user manager.
        for unit in [
            "user@abc.service",
            "user@.service",
            "user@01000.service",
            "user@1000.scope",
        ] {
            let f = facts(&format!("0::/user.slice/{unit}/app.slice/x.service\n"));
            assert!(!f.user_delegated, "{unit}");
        }
    }

    #[test]
    fn hybrid_hosts() {
        // Delegation seen in either hierarchy counts; the unit is then not reported as a
        // system unit.
        let f = facts(
            "1:name=systemd:/system.slice/nginx.service\n\
             0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.service\n",
        );
        assert_eq!(f.path, "/system.slice/nginx.service");
        assert!(f.user_delegated);
        assert_eq!((f.systemd_unit, f.systemd_slice), (None, None));
        // Equal paths (the usual case for systemd units).
        let f =
            facts("1:name=systemd:/system.slice/nginx.service\n0::/system.slice/nginx.service\n");
        assert_eq!(f.systemd_unit.as_deref(), Some("nginx.service"));
        // Both lines are validated even though one is used.
        assert!(
            err("1:name=systemd:/system.slice/a.service\n0::/system.slice/../b.service\n")
                .contains("line 2")
        );
        // pids before memory before cpu on pure v1 without name=systemd.
        let f = facts("3:cpu:/c\n2:memory:/m\n1:pids:/p\n");
        assert_eq!(f.path, "/p");
        let f = facts("3:cpu,cpuacct:/c\n2:memory:/m\n1:devices:/d\n");
        assert_eq!(f.path, "/m");
        let f = facts("2:cpuacct:/a\n1:cpu:/c\n");
        assert_eq!(f.path, "/c");
    }

    #[test]
    fn this_machine_parses() {
        // Whatever host the tests run on, its own file is well formed.
        if let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") {
            facts(&text);
        }
    }

    #[test]
    fn malformed_input_is_rejected() {
        let id = NETDATA_CTR;
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "empty"),
            ("\n".to_owned(), "line 1: expected"),
            ("0::/\n\n".to_owned(), "line 2: expected"),
            ("\n0::/\n".to_owned(), "line 1: expected"),
            ("hello\n".to_owned(), "line 1: expected hierarchy-ID:controllers:path"),
            ("0:/system.slice\n".to_owned(), "line 1: expected"),
            ("2:pids:/\ngarbage\n0::/\n".to_owned(), "line 2: expected"),
            ("x::/\n".to_owned(), "line 1: the hierarchy ID is not a decimal number"),
            ("-1::/\n".to_owned(), "not a decimal number"),
            ("00::/\n".to_owned(), "not a decimal number"),
            ("+1:pids:/\n".to_owned(), "not a decimal number"),
            ("99999999999:pids:/\n".to_owned(), "not a decimal number"),
            (" 0::/\n".to_owned(), "not a decimal number"),
            ("0:memory:/\n".to_owned(), "hierarchy 0 (cgroup v2) must have an empty controller list"),
            ("3::/x\n".to_owned(), "must name its controllers"),
            ("3:Memory:/x\n".to_owned(), "invalid controller list"),
            ("3:cpu,,cpuacct:/x\n".to_owned(), "invalid controller list"),
            ("3:name=:/x\n".to_owned(), "invalid controller list"),
            ("3:name=a b:/x\n".to_owned(), "invalid controller list"),
            ("2:pids:/\n2:memory:/\n".to_owned(), "line 2: hierarchy 2 is listed twice"),
            ("3:pids:/\n2:pids,memory:/\n".to_owned(), "line 2: a controller is listed twice"),
            ("2:name=systemd:/\n1:name=systemd:/a.service\n".to_owned(), "line 2: a controller is listed twice"),
            ("0::/\n0::/\n".to_owned(), "line 2: follows hierarchy 0"),
            // A forged line after the v2 line (what a newline in a cgroup name would
            // give on kernels before 4.13).
            (
                "0::/user.slice/user-1000.slice/user@1000.service/x\n1:name=systemd:/system.slice/nginx.service\n"
                    .to_owned(),
                "line 2: follows hierarchy 0",
            ),
            ("0::system.slice/nginx.service\n".to_owned(), "path does not start with '/'"),
            ("0::\n".to_owned(), "path does not start with '/'"),
            ("0::/system.slice/../nginx.service\n".to_owned(), "'..' component"),
            ("0::/../../system.slice/nginx.service\n".to_owned(), "'..' component"),
            ("0::/system.slice/./nginx.service\n".to_owned(), "'..' component"),
            ("0::/..\n".to_owned(), "'..' component"),
            ("0::/system.slice//nginx.service\n".to_owned(), "empty component"),
            ("0::/system.slice/\n".to_owned(), "empty component"),
            ("0::/system.slice/nginx\0.service\n".to_owned(), "control character"),
            ("0::/system.slice/nginx\t.service\n".to_owned(), "control character"),
            ("0::/system.slice/nginx\r\n".to_owned(), "control character"),
            ("0::/system.slice/nginx\x7f.service\n".to_owned(), "control character"),
            ("0::/system.slice/ngin\u{85}x.service\n".to_owned(), "non-ASCII"),
            ("0::/system.slice/nginx\u{2028}.service\n".to_owned(), "non-ASCII"),
            (format!("0::/system.slice/docker-{id}.scope (deleted)\n"), "(deleted)"),
            (format!("0::/{}\n", "a".repeat(4096)), "longer than 4096 bytes"),
            ("5:devices:/x\n4:freezer:/y\n".to_owned(), "no usable hierarchy"),
            ("9:pids:/\n".repeat(200), "line 2: hierarchy 9 is listed twice"),
            (
                (1..=200).rev().map(|i| format!("{i}:c{i}:/\n")).collect::<String>(),
                "more than 128 lines",
            ),
        ];
        for (content, want) in &cases {
            let e = err(content);
            assert!(e.contains(want), "{content:?}: {e:?} lacks {want:?}");
        }
        // The length limit is inclusive.
        let path = format!("/{}", "a".repeat(4095));
        assert_eq!(facts(&format!("0::{path}\n")).path, path);
        // Oversized input is refused before anything else.
        assert!(err(&"x".repeat(MAX_INPUT_LEN + 1)).contains("longer than"));
        // Colons in a path are data (only the first two separate fields).
        assert_eq!(facts("0::/a:b\n").path, "/a:b");
        // Error messages quote no input.
        assert!(!err("0::/secret/../x\n").contains("secret"));
    }

    mod properties {
        use super::*;
        use carapace_fuzzkit::proptest::prelude::*;
        use carapace_fuzzkit::{bounded, config, mutated_text};

        /// Real files from the cases above, each with a marker component that must never
        /// appear in an error message.
        fn seeds() -> Vec<String> {
            vec![
                format!("12:rdma:/\n11:perf_event:/docker/{DOCKER_V1_ID}\n10:freezer:/docker/{DOCKER_V1_ID}\n1:name=systemd:/docker/{DOCKER_V1_ID}\n0::/\n"),
                format!("0::/system.slice/docker-{DOCKER_DOCS_ID}.scope\n"),
                format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{NETDATA_CTR}.scope\n", NETDATA_POD.replace('-', "_")),
                format!("1:name=systemd:/kubepods/besteffort/pod{NETDATA_POD}/{NETDATA_CTR}\n0::/\n"),
                format!("0::/machine.slice/libpod-{DOCKER_HYBRID_ID}.scope/container\n"),
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.service\n".into(),
                format!("0::/user.slice/user-1000.slice/user@1000.service/user.slice/docker-{DOCKER_DOCS_ID}.scope\n"),
                "12:hugetlb:/\n11:freezer:/\n10:blkio:/user.slice\n9:cpu,cpuacct:/user.slice\n2:pids:/\n1:name=systemd:/\n0::/system.slice/nginx.service\n".into(),
                "0::/system.slice/MARKERXYZ.service/sub\n".into(),
            ]
        }

        fn is_hex64(s: &str) -> bool {
            s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        }

        proptest! {
            #![proptest_config(config(3000))]

            /// Never a panic or a large allocation; what is accepted keeps the module's
            /// promises: the path is one of the file's paths, a unit and slice are
            /// components of it, IDs are canonical, and nothing in a delegated subtree is
            /// a container or pod. Errors quote no input.
            #[test]
            fn cgroup_files_never_panic_and_accepted_facts_come_from_the_path(
                content in mutated_text(seeds()),
            ) {
                match bounded("/proc/<pid>/cgroup", content.len(), || parse_proc_cgroup(&content)) {
                    Ok(f) => {
                        let lines: Vec<&str> = content.strip_suffix('\n').unwrap_or(&content).split('\n').collect();
                        prop_assert!(
                            lines.iter().any(|l| l.splitn(3, ':').nth(2) == Some(f.path.as_str())),
                            "path {:?} is not one of the file's paths", f.path
                        );
                        let components: Vec<&str> = f.path.split('/').collect();
                        if let Some(unit) = &f.systemd_unit {
                            // A component, once cg_escape's `_` prefix is undone.
                            prop_assert!(
                                f.user_delegated || components.iter().any(|c| unescape(c) == unit),
                                "{:?}", f
                            );
                        }
                        if let Some(slice) = &f.systemd_slice {
                            prop_assert!(slice == "-.slice" || slice.ends_with(".slice"), "{:?}", f);
                        }
                        if let Some(id) = &f.container_id {
                            prop_assert!(is_hex64(id) && f.path.contains(id.as_str()), "{:?}", f);
                        }
                        if let Some(uid) = &f.pod_uid {
                            prop_assert_eq!(uid.len(), 36);
                            prop_assert!(uid.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
                        }
                        if f.user_delegated {
                            prop_assert!(f.container_id.is_none() && f.pod_uid.is_none(), "{:?}", f);
                        }
                        // Deterministic.
                        prop_assert_eq!(parse_proc_cgroup(&content).unwrap(), f);
                    }
                    Err(e) => prop_assert!(!e.contains("MARKERXYZ"), "{}", e),
                }
            }
        }
    }
}
