//! `carapace-lab up|down|status`: the lab for a person.
//!
//! `up` starts, in one directory, a SoftHSM2 token, a swtpm with EK certificates from the
//! lab's EK CA, and an MIT KDC with a host and a service keytab; makes an SSH CA and a host
//! key with a host certificate from it (for `sshpop`); writes a server config
//! whose CA keys live in the token, an agent config, and an `env` file; and records every
//! daemon it started in `lab.json` with its pid, start time and executable. The daemons
//! run in their own process group and outlive the command. `down` stops exactly those
//! processes, each only after checking that its pid still names the recorded process.
//!
//! Layout of a lab directory:
//!
//! | path | what |
//! |---|---|
//! | `hsm/` | `softhsm2.conf`, `tokens/`, `carapace.pin` (the user PIN, 0600) |
//! | `tpm/` | the EK CA (`ca/`), the manufactured `template/`, the running instance (`swtpm/`) |
//! | `krb/` | `krb5.conf`, `kdc.conf`, the database, `host.keytab`, `service.keytab`, `kdc.log` |
//! | `ssh/` | the SSH CA (`ssh_ca`, `ssh_ca.pub`), the host key `ssh_host_ed25519_key` (+ `.pub`) and its host certificate `ssh_host_ed25519_key-cert.pub` |
//! | `server.toml`, `agent.toml` | configs for `carapace-server run` and `carapace-agent run` |
//! | `server/`, `agent/`, `workload/` | their data dirs and the Workload API socket (made by them) |
//! | `env` | `export` lines for a shell: `SOFTHSM2_CONF`, `KRB5_CONFIG`, `TPM2TOOLS_TCTI`, ... |
//! | `lab.json` | the running daemons, for `down` and `status` |
//!
//! Secrets (the PIN, keytabs, the EK CA's and the KDC's keys, the SSH CA's and host's
//! private keys) stay in 0700 directories and are never printed: the output names the
//! files that hold them.

use std::fmt::{self, Write as _};
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

use crate::kdc::{KRB5_PACKAGES, Kdc, LabPrincipals};
use crate::process::{self, Liveness, ProcInfo, ProcessGroup, Recorded, StopOutcome};
use crate::softhsm::{SoftHsm, Token};
use crate::ssh::{HOST_CERT_VALIDITY, LabSshHost, OPENSSH_CLIENT_PACKAGE};
use crate::swtpm::{
    NV_EK_CERT_ECC_P384, NV_EK_CERT_RSA2048, SWTPM_PACKAGES, Swtpm, TPM2_TOOLS_PACKAGE,
    TpmManufacturer,
};
use crate::{Error, Result};

/// The lab directory when none is given: `./carapace-lab`.
pub const DEFAULT_DIR: &str = "carapace-lab";
/// The default trust domain of the server and agent configs.
pub const DEFAULT_TRUST_DOMAIN: &str = "example.org";
/// The Kerberos realm of the lab.
pub const DEFAULT_REALM: &str = "LAB.TEST";
/// The label of the SoftHSM2 token that holds the server's CA keys.
pub const TOKEN_LABEL: &str = "carapace";
/// The format version of `lab.json`.
const STATE_VERSION: u32 = 1;
/// Longest Unix socket path the server and agent accept.
const MAX_SOCKET_PATH: usize = 100;

/// What `carapace-lab up` builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpOptions {
    /// The lab directory (created if missing; it must be empty, or hold a stopped lab).
    pub dir: PathBuf,
    /// The trust domain of the server and agent configs.
    pub trust_domain: String,
    /// The server's node API port on 127.0.0.1; a free port when `None`.
    pub server_port: Option<u16>,
    /// The Kerberos realm.
    pub realm: String,
}

impl Default for UpOptions {
    fn default() -> Self {
        UpOptions {
            dir: PathBuf::from(DEFAULT_DIR),
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            server_port: None,
            realm: DEFAULT_REALM.into(),
        }
    }
}

/// The paths of a lab directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// The layout of the lab in `dir` (made absolute against the current directory).
    pub fn new(dir: &Path) -> Result<Layout> {
        let dir = if dir.is_absolute() {
            dir.to_owned()
        } else {
            std::env::current_dir()
                .map_err(|e| Error::io(".", e))?
                .join(dir)
        };
        Ok(Layout { dir })
    }

    /// The lab directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `lab.json`: the daemons `up` started.
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("lab.json")
    }

    /// The SoftHSM2 directory.
    pub fn hsm(&self) -> PathBuf {
        self.dir.join("hsm")
    }

    /// The TPM manufacturer's directory (EK CA and template).
    pub fn tpm(&self) -> PathBuf {
        self.dir.join("tpm")
    }

    /// The running swtpm's directory.
    pub fn swtpm(&self) -> PathBuf {
        self.tpm().join("swtpm")
    }

    /// The Kerberos realm's directory.
    pub fn krb(&self) -> PathBuf {
        self.dir.join("krb")
    }

    /// The SSH CA's and the lab host's directory (see [`crate::ssh`]).
    pub fn ssh(&self) -> PathBuf {
        self.dir.join("ssh")
    }

    /// The server config.
    pub fn server_toml(&self) -> PathBuf {
        self.dir.join("server.toml")
    }

    /// The agent config.
    pub fn agent_toml(&self) -> PathBuf {
        self.dir.join("agent.toml")
    }

    /// The shell environment file.
    pub fn env_file(&self) -> PathBuf {
        self.dir.join("env")
    }

    /// The server's data directory (made by the server, 0700).
    pub fn server_data(&self) -> PathBuf {
        self.dir.join("server")
    }

    /// The server's admin socket, in its data directory.
    pub fn admin_socket(&self) -> PathBuf {
        self.server_data().join("admin.sock")
    }

    /// The agent's data directory (made by the agent, 0700).
    pub fn agent_data(&self) -> PathBuf {
        self.dir.join("agent")
    }

    /// The Workload API socket. Not in the agent's data directory: the agent makes the
    /// socket's directory 0755, and its data directory must stay 0700.
    pub fn workload_socket(&self) -> PathBuf {
        self.dir.join("workload").join("api.sock")
    }

    /// Where the printed steps put the server's trust bundle for the agent.
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }

    /// Marks the directory as a lab's, so that `up` may clean it and `down --purge` may
    /// remove it; no other directory is ever emptied.
    fn marker(&self) -> PathBuf {
        self.dir.join(".carapace-lab")
    }

    fn lock_file(&self) -> PathBuf {
        self.dir.join(".lock")
    }

    /// Everything `up` makes or tells people to make, removed before a new `up`.
    fn lab_entries(&self) -> Vec<PathBuf> {
        [
            "hsm",
            "tpm",
            "krb",
            "ssh",
            "server",
            "agent",
            "workload",
            "bundle.pem",
            "server.toml",
            "agent.toml",
            "server.log",
            "agent.log",
            "env",
            "lab.json",
        ]
        .iter()
        .map(|e| self.dir.join(e))
        .collect()
    }
}

/// `lab.json`: what `up` started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    /// Format version.
    pub version: u32,
    /// The lab directory.
    pub dir: PathBuf,
    /// The boot the pids belong to (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// When `up` finished, in seconds since the Unix epoch.
    pub started_unix: u64,
    /// The trust domain of the configs.
    pub trust_domain: String,
    /// The server's node API address in the configs (the server is not started by `up`).
    pub server_address: String,
    /// The Kerberos realm.
    pub realm: String,
    /// The daemons, in start order.
    pub processes: Vec<ProcessRecord>,
}

/// One daemon `up` started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// `swtpm` or `krb5kdc`.
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// Its start time (`/proc/<pid>/stat` field 22, clock ticks after boot).
    pub starttime: u64,
    /// Its executable.
    pub exe: PathBuf,
    /// What it serves, for people.
    pub serves: String,
    /// Its log file.
    pub log: PathBuf,
}

impl ProcessRecord {
    fn recorded(&self) -> Recorded<'_> {
        Recorded {
            pid: self.pid,
            starttime: self.starttime,
            exe: &self.exe,
        }
    }
}

impl LabState {
    /// Reads `lab.json` of the lab in `dir`; `None` if there is none.
    pub fn read(layout: &Layout) -> Result<Option<LabState>> {
        let path = layout.state_file();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Other(format!("{}: {e}", path.display())))
    }

    fn write(&self, layout: &Layout) -> Result<()> {
        let path = layout.state_file();
        let tmp = layout.dir.join(".lab.json.tmp");
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
        crate::write_file(&tmp, &(text + "\n"))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
    }

    /// Whether each recorded daemon still runs. After a reboot every one is gone.
    pub fn liveness(&self) -> Result<Vec<(&ProcessRecord, Liveness)>> {
        let same_boot = process::boot_id()? == self.boot_id;
        self.processes
            .iter()
            .map(|p| {
                let l = if same_boot {
                    p.recorded().liveness()?
                } else {
                    Liveness::Gone
                };
                Ok((p, l))
            })
            .collect()
    }

    fn running(&self) -> Result<Vec<&ProcessRecord>> {
        Ok(self
            .liveness()?
            .into_iter()
            .filter(|(_, l)| *l == Liveness::Running)
            .map(|(p, _)| p)
            .collect())
    }
}

/// An exclusive lock on a lab directory for the length of one command, so that two
/// commands never work on one lab at once.
#[derive(Debug)]
struct DirLock {
    _file: File,
}

impl DirLock {
    fn take(layout: &Layout) -> Result<DirLock> {
        let path = layout.lock_file();
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(DirLock { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::Other(format!(
                "another carapace-lab command is working on {}",
                layout.dir.display()
            ))),
            Err(e) => Err(Error::Other(format!("locking {}: {e}", path.display()))),
        }
    }
}

// ---------------------------------------------------------------------------------------
// up
// ---------------------------------------------------------------------------------------

/// What `up` started and wrote; its [`fmt::Display`] is the text for the person.
#[derive(Debug)]
pub struct UpReport {
    /// The lab's paths.
    pub layout: Layout,
    /// What was recorded in `lab.json`.
    pub state: LabState,
    /// The token holding the server's CA keys (its `Debug` hides the PINs).
    pub token: Token,
    /// `SOFTHSM2_CONF`.
    pub softhsm2_conf: PathBuf,
    /// The PKCS#11 module.
    pub pkcs11_module: PathBuf,
    /// The swtpm's TCTI.
    pub tcti: String,
    /// The EK CA root certificate: the TPM trust anchor for the server's config.
    pub ek_ca_root: PathBuf,
    /// The EK CA intermediate certificate.
    pub ek_ca_intermediate: PathBuf,
    /// The Kerberos principals and keytabs.
    pub principals: LabPrincipals,
    /// `KRB5_CONFIG`.
    pub krb5_conf: PathBuf,
    /// The SSH CA and the host key it certified.
    pub ssh: LabSshHost,
    /// Whether the files of an earlier, stopped lab were removed first.
    pub replaced_previous: bool,
    /// How long `up` took.
    pub elapsed: Duration,
}

/// Starts a lab (see the module documentation). On any error, whatever was started
/// already is stopped again (`lab.json` then lists it as exited).
pub fn up(opts: &UpOptions) -> Result<UpReport> {
    let t0 = Instant::now();
    check_trust_domain(&opts.trust_domain)?;
    crate::kdc::check_realm(&opts.realm)?;
    let layout = Layout::new(&opts.dir)?;
    let replaced_previous = claim_dir(&layout)?;
    let _lock = DirLock::take(&layout)?;
    if let Some(state) = LabState::read(&layout)? {
        let running = state.running()?;
        if !running.is_empty() {
            let list: Vec<String> = running
                .iter()
                .map(|p| format!("{} pid {}", p.name, p.pid))
                .collect();
            return Err(Error::Other(format!(
                "a lab is already running in {} ({}); stop it first with: carapace-lab down --dir {}",
                layout.dir.display(),
                list.join(", "),
                shell_quote(&layout.dir.display().to_string()),
            )));
        }
    }
    // Every program, before anything starts: a missing package is one clear error.
    for (program, package) in [
        ("softhsm2-util", "softhsm2"),
        ("swtpm", SWTPM_PACKAGES),
        ("swtpm_setup", SWTPM_PACKAGES),
        ("tpm2_getrandom", TPM2_TOOLS_PACKAGE),
        ("krb5kdc", KRB5_PACKAGES),
        ("kdb5_util", KRB5_PACKAGES),
        ("kadmin.local", KRB5_PACKAGES),
        ("ssh-keygen", OPENSSH_CLIENT_PACKAGE),
    ] {
        process::require(program, package)?;
    }
    for (what, path) in [
        ("admin_socket", layout.admin_socket()),
        ("socket_path", layout.workload_socket()),
    ] {
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::Other(format!(
                "{what} {} would be longer than a Unix socket path may be ({MAX_SOCKET_PATH} \
                 bytes): choose a shorter --dir",
                path.display()
            )));
        }
    }
    let server_port = match opts.server_port {
        Some(port) => {
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map_err(|e| {
                Error::Other(format!(
                    "--server-port {port}: 127.0.0.1:{port} is not free: {e}"
                ))
            })?;
            port
        }
        None => process::free_tcp_port()?,
    };
    let replaced_previous = remove_previous(&layout)? || replaced_previous;

    let server_address = format!("127.0.0.1:{server_port}");
    let mut state = LabState {
        version: STATE_VERSION,
        dir: layout.dir.clone(),
        boot_id: process::boot_id()?,
        started_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        trust_domain: opts.trust_domain.clone(),
        server_address: server_address.clone(),
        realm: opts.realm.clone(),
        processes: Vec::new(),
    };

    let hsm = SoftHsm::in_dir(&layout.hsm())?;
    let token = hsm.init_token(TOKEN_LABEL)?;
    let manufacturer = TpmManufacturer::in_dir(&layout.tpm())?;
    // Each daemon is recorded as soon as it runs: should this command be killed before
    // its guards run, `down` still finds everything it started.
    let tpm = Swtpm::start_in(&manufacturer, &layout.swtpm(), ProcessGroup::Own)?;
    state.processes.push(record(
        tpm.child(),
        format!(
            "TPM 127.0.0.1:{} (control {}), TCTI {}",
            tpm.port(),
            tpm.ctrl_port(),
            tpm.tcti()
        ),
    )?);
    state.write(&layout)?;
    let kdc = Kdc::start_in(&layout.krb(), &opts.realm, ProcessGroup::Own)?;
    state.processes.push(record(
        kdc.child(),
        format!(
            "KDC 127.0.0.1:{} udp+tcp, realm {}",
            kdc.port(),
            kdc.realm()
        ),
    )?);
    state.write(&layout)?;
    let principals = kdc.provision_host_and_service()?;
    // The SSH host is the realm's host: node1 in the realm's DNS domain.
    let domain = kdc.realm().to_ascii_lowercase();
    let ssh = crate::ssh::provision_lab_host(&layout.ssh(), &domain)?;

    let configs = Configs {
        layout: &layout,
        trust_domain: &opts.trust_domain,
        server_address: &server_address,
        hsm: &hsm,
        token: &token,
        manufacturer: &manufacturer,
        tcti: &tpm.tcti(),
        kdc: &kdc,
        principals: &principals,
        domain: &domain,
        ssh: &ssh,
    };
    crate::write_file(&layout.server_toml(), &configs.server_toml())?;
    crate::write_file(&layout.agent_toml(), &configs.agent_toml())?;
    crate::write_file(&layout.env_file(), &configs.env_file())?;

    let report = UpReport {
        tcti: tpm.tcti(),
        ek_ca_root: manufacturer.ek_ca_root(),
        ek_ca_intermediate: manufacturer.ek_ca_intermediate(),
        krb5_conf: kdc.krb5_conf(),
        softhsm2_conf: hsm.conf().to_owned(),
        pkcs11_module: hsm.module().to_owned(),
        layout,
        state,
        token,
        principals,
        ssh,
        replaced_previous,
        elapsed: t0.elapsed(),
    };
    // Recorded: from here on the daemons are `down`'s to stop.
    tpm.detach();
    kdc.detach();
    Ok(report)
}

/// A trust domain name as the server accepts it: lowercase letters, digits, `.`, `-`, `_`.
fn check_trust_domain(td: &str) -> Result<()> {
    let ok = !td.is_empty()
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Other(format!(
            "trust domain {td:?}: use lowercase letters, digits, '.', '-' and '_' (e.g. example.org)"
        )))
    }
}

/// Creates the lab directory or checks that it may be used: empty, or a lab's. Returns
/// whether it was a lab's already.
fn claim_dir(layout: &Layout) -> Result<bool> {
    let dir = &layout.dir;
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if layout.marker().is_file() {
                return Ok(true);
            }
            if entries.next().is_some() {
                return Err(Error::Other(format!(
                    "{} is not empty and holds no carapace lab; choose another --dir",
                    dir.display()
                )));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // 0755: the agent's Workload API socket inside must be reachable; everything
            // secret is in a 0700 subdirectory.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|e| Error::io(dir, e))?;
        }
        Err(e) => return Err(Error::io(dir, e)),
    }
    crate::write_file(
        &layout.marker(),
        "This directory is a carapace-lab lab: `carapace-lab up` may empty it and \
         `carapace-lab down --purge` removes it.\n",
    )?;
    Ok(false)
}

/// Removes what an earlier lab in this directory left; whether there was anything.
fn remove_previous(layout: &Layout) -> Result<bool> {
    let mut any = false;
    for path in layout.lab_entries() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        any = true;
        let removed = if meta.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| Error::io(&path, e))?;
    }
    Ok(any)
}

fn record(child: &process::Child, serves: String) -> Result<ProcessRecord> {
    let pid = child.pid();
    let info = ProcInfo::of(pid)?
        .ok_or_else(|| Error::Other(format!("{} (pid {pid}) exited", child.name())))?;
    let exe = info
        .exe
        .ok_or_else(|| Error::Other(format!("cannot read /proc/{pid}/exe")))?;
    Ok(ProcessRecord {
        name: child.name().to_owned(),
        pid,
        starttime: info.starttime,
        exe,
        serves,
        log: child.log().to_owned(),
    })
}

/// The configs and the env file of one lab.
struct Configs<'a> {
    layout: &'a Layout,
    trust_domain: &'a str,
    server_address: &'a str,
    hsm: &'a SoftHsm,
    token: &'a Token,
    manufacturer: &'a TpmManufacturer,
    tcti: &'a str,
    kdc: &'a Kdc,
    principals: &'a LabPrincipals,
    domain: &'a str,
    ssh: &'a LabSshHost,
}

impl Configs<'_> {
    /// The server config; the keys are those of conf/server.full.toml.
    fn server_toml(&self) -> String {
        let l = self.layout;
        format!(
            "# carapace-server config written by `carapace-lab up` (see conf/server.full.toml).\n\
             # Run it with SOFTHSM2_CONF set (`. {env}`):\n\
             #   carapace-server run --config {me}\n\
             trust_domain = {td}\n\
             data_dir = {data}\n\
             bind_address = {bind}\n\
             admin_socket = {admin}\n\
             \n\
             # The CA keys are generated and used inside the lab's SoftHSM2 token; the user PIN\n\
             # is read from pin_file. The token is visible with SOFTHSM2_CONF={conf}.\n\
             [key_manager.pkcs11]\n\
             module = {module}\n\
             token_label = {label}\n\
             pin_file = {pin}\n\
             \n\
             [node_attestor.join_token]\n\
             \n\
             # TPM node attestation: EK certificates chain to the lab's EK CA.\n\
             [node_attestor.tpm]\n\
             ek_ca_files = [{root_toml}, {intermediate_toml}]\n\
             \n\
             # Kerberos node attestation: hosts of the lab realm present a ticket for the\n\
             # service principal, whose keys are in the lab's service keytab.\n\
             [node_attestor.kerberos]\n\
             keytab = {keytab_toml}\n\
             service_principal = {service_toml}\n\
             allowed_realms = [{realm_toml}]\n\
             \n\
             # SSH host-certificate node attestation: hosts present a host certificate signed\n\
             # by the lab's SSH CA, naming a host of the lab's domain.\n\
             [node_attestor.sshpop]\n\
             cert_authorities_path = {ssh_ca_toml}\n\
             canonical_domain = {domain_toml}\n",
            env = self.layout.env_file().display(),
            me = l.server_toml().display(),
            td = toml_str(self.trust_domain),
            data = toml_path(&l.server_data()),
            bind = toml_str(self.server_address),
            admin = toml_path(&l.admin_socket()),
            conf = self.hsm.conf().display(),
            module = toml_path(self.hsm.module()),
            label = toml_str(&self.token.label),
            pin = toml_path(&self.token.pin_file),
            root_toml = toml_path(&self.manufacturer.ek_ca_root()),
            intermediate_toml = toml_path(&self.manufacturer.ek_ca_intermediate()),
            keytab_toml = toml_path(&self.principals.service_keytab),
            service_toml = toml_str(&self.principals.service),
            realm_toml = toml_str(self.kdc.realm()),
            ssh_ca_toml = toml_path(&self.ssh.ca_pub),
            domain_toml = toml_str(self.domain),
        )
    }

    /// The agent config; the keys are those of conf/agent.full.toml.
    fn agent_toml(&self) -> String {
        let l = self.layout;
        format!(
            "# carapace-agent config written by `carapace-lab up` (see conf/agent.full.toml).\n\
             # First start: the server's bundle in trust_bundle_path and a join token:\n\
             #   CARAPACE_JOIN_TOKEN=<token> carapace-agent run --config {me}\n\
             trust_domain = {td}\n\
             server_address = {server}\n\
             data_dir = {data}\n\
             socket_path = {socket}\n\
             trust_bundle_path = {bundle}\n\
             \n\
             [key_manager.disk]\n\
             \n\
             [node_attestor.join_token]\n\
             \n\
             [workload_attestor.unix]\n\
             workload_sha256 = false\n\
             \n\
             # To attest with the lab's TPM instead of a join token, replace\n\
             # [node_attestor.join_token] with:\n\
             #   [node_attestor.tpm]\n\
             #   tcti = {tcti_toml}\n\
             # or, to attest as the lab realm's host {host} (run the agent with the env file\n\
             # sourced, so krb5 finds the lab KDC):\n\
             #   [node_attestor.kerberos]\n\
             #   keytab = {keytab_toml}\n\
             #   principal = {host_toml}\n\
             #   service_principal = {service_toml}\n\
             # or, to attest with the lab host's SSH host certificate (signed by the lab's SSH CA;\n\
             # host_cert_path defaults to <host_key_path>-cert.pub, which is where it is):\n\
             #   [node_attestor.sshpop]\n\
             #   host_key_path = {ssh_key_toml}\n",
            me = l.agent_toml().display(),
            td = toml_str(self.trust_domain),
            server = toml_str(self.server_address),
            data = toml_path(&l.agent_data()),
            socket = toml_path(&l.workload_socket()),
            bundle = toml_path(&l.bundle()),
            tcti_toml = toml_str(self.tcti),
            host = self.principals.host,
            keytab_toml = toml_path(&self.principals.host_keytab),
            host_toml = toml_str(&self.principals.host),
            service_toml = toml_str(&self.principals.service),
            ssh_key_toml = toml_path(&self.ssh.host_key),
        )
    }

    /// `export` lines for a POSIX shell.
    fn env_file(&self) -> String {
        let l = self.layout;
        let mut vars: Vec<(String, String)> = Vec::new();
        vars.extend(self.hsm.envs());
        vars.extend(self.kdc.envs());
        vars.push(("TPM2TOOLS_TCTI".into(), self.tcti.to_owned()));
        vars.push((
            "CARAPACE_ADMIN_SOCKET".into(),
            l.admin_socket().display().to_string(),
        ));
        vars.push((
            "CARAPACE_AGENT_SOCKET".into(),
            l.workload_socket().display().to_string(),
        ));
        let mut text = format!(
            "# Written by `carapace-lab up`: `. {}` points the tools at this lab.\n",
            shell_quote(&l.env_file().display().to_string())
        );
        for (k, v) in vars {
            let _ = writeln!(text, "export {k}={}", shell_quote(&v));
        }
        text
    }
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn toml_path(p: &Path) -> String {
    toml_str(&p.display().to_string())
}

/// `s` quoted for a POSIX shell, unless it needs no quotes.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:=,@%".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A binary next to this one (a cargo target dir holds carapace-server and -agent too),
/// or its bare name for `PATH`.
fn sibling_binary(name: &str) -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .map(|p| shell_quote(&p.display().to_string()))
        .unwrap_or_else(|| name.to_owned())
}

impl fmt::Display for UpReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.layout;
        let q = |p: &Path| shell_quote(&p.display().to_string());
        let dir = q(l.dir());
        let server = sibling_binary("carapace-server");
        let agent = sibling_binary("carapace-agent");
        let td = &self.state.trust_domain;
        let p = &self.principals;
        writeln!(
            f,
            "carapace lab up in {} ({:.1} s){}\n",
            l.dir().display(),
            self.elapsed.as_secs_f64(),
            if self.replaced_previous {
                "; the files of the earlier lab there were removed"
            } else {
                ""
            }
        )?;
        writeln!(f, "Running (until `carapace-lab down --dir {dir}`):")?;
        for proc in &self.state.processes {
            writeln!(
                f,
                "  {:<8} pid {:<7} {}\n  {:<8} log {}",
                proc.name,
                proc.pid,
                proc.serves,
                "",
                proc.log.display()
            )?;
        }
        writeln!(f, "\nProvisioned:")?;
        writeln!(
            f,
            "  SoftHSM2 token {:?} (serial {}), SOFTHSM2_CONF={}\n  \
             \x20 user PIN in {} (0600; never printed)",
            self.token.label,
            self.token.serial,
            self.softhsm2_conf.display(),
            self.token.pin_file.display()
        )?;
        writeln!(
            f,
            "  TPM EK CA root {} (the server's TPM trust anchor)\n  \
             \x20 intermediate {}; EK certificates in NV {NV_EK_CERT_RSA2048:#010x} (RSA-2048) \
             and {NV_EK_CERT_ECC_P384:#010x} (P-384)",
            self.ek_ca_root.display(),
            self.ek_ca_intermediate.display()
        )?;
        writeln!(
            f,
            "  Kerberos realm {}: {} in {}\n  \
             \x20 {} in {}",
            self.state.realm,
            p.host,
            p.host_keytab.display(),
            p.service,
            p.service_keytab.display()
        )?;
        let s = &self.ssh;
        writeln!(
            f,
            "  SSH CA {} (the server's sshpop trust anchor; private key in {}, 0600)\n  \
             \x20 host key {} (0600), sshpop agent ID spiffe://{td}/spire/agent/sshpop/{}\n  \
             \x20 host certificate {} (key ID {}, principals {}, valid {})",
            s.ca_pub.display(),
            s.ca_key.display(),
            s.host_key.display(),
            s.agent_path(),
            s.host_cert.display(),
            s.key_id,
            s.principals.join(","),
            HOST_CERT_VALIDITY,
        )?;
        writeln!(f, "\nWritten:")?;
        writeln!(
            f,
            "  {}  carapace-server: trust domain {td}, node API {}, CA keys in the token",
            l.server_toml().display(),
            self.state.server_address
        )?;
        writeln!(
            f,
            "  {}  carapace-agent: join token (TPM, Kerberos and sshpop in its comments), \
             Workload API {}",
            l.agent_toml().display(),
            l.workload_socket().display()
        )?;
        writeln!(
            f,
            "  {}  SOFTHSM2_CONF, KRB5_CONFIG, TPM2TOOLS_TCTI, CARAPACE_ADMIN_SOCKET, ...",
            l.env_file().display()
        )?;
        writeln!(f, "  {}  what `down` stops", l.state_file().display())?;

        let env = q(&l.env_file());
        writeln!(f, "\nUse it (in a shell, after `. {env}`):")?;
        writeln!(
            f,
            "  # server (CA keys in the token) and agent, in the background"
        )?;
        writeln!(
            f,
            "  {server} run --config {} > {} 2>&1 &",
            q(&l.server_toml()),
            q(&l.dir().join("server.log"))
        )?;
        writeln!(f, "  {server} healthcheck")?;
        writeln!(f, "  {server} bundle show > {}", q(&l.bundle()))?;
        writeln!(
            f,
            "  {server} token generate                  # prints Token: and Agent ID:"
        )?;
        writeln!(
            f,
            "  CARAPACE_JOIN_TOKEN=<Token> {agent} run --config {} > {} 2>&1 &",
            q(&l.agent_toml()),
            q(&l.dir().join("agent.log"))
        )?;
        writeln!(
            f,
            "  {server} entry create --parent-id <Agent ID> --spiffe-id spiffe://{td}/me \
             --selector unix:uid:$(id -u)"
        )?;
        writeln!(f, "  {agent} api fetch x509")?;
        writeln!(f, "  # TPM")?;
        writeln!(f, "  tpm2_getrandom --hex 16")?;
        writeln!(
            f,
            "  tpm2_nvread -C o {NV_EK_CERT_RSA2048:#010x} | openssl x509 -inform DER -noout -subject -issuer"
        )?;
        writeln!(f, "  # Kerberos")?;
        writeln!(
            f,
            "  kinit -kt {} {} && kvno {} && klist",
            q(&p.host_keytab),
            p.host,
            p.service
        )?;
        writeln!(f, "  # SSH")?;
        writeln!(f, "  ssh-keygen -L -f {}", q(&self.ssh.host_cert))?;
        writeln!(
            f,
            "  # PKCS#11 (asks for the user PIN, which is in the PIN file)"
        )?;
        writeln!(
            f,
            "  pkcs11-tool --module {} --token-label {} --login --list-objects",
            q(&self.pkcs11_module),
            self.token.label
        )?;
        writeln!(
            f,
            "\nStop it with: carapace-lab down --dir {dir}   (stops swtpm and krb5kdc only: \
             stop a server and agent you started yourself)"
        )
    }
}

// ---------------------------------------------------------------------------------------
// down and status
// ---------------------------------------------------------------------------------------

/// What `down` did; its [`fmt::Display`] is the text for the person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownReport {
    /// The lab directory.
    pub dir: PathBuf,
    /// Each recorded daemon and what became of it; empty when no lab was recorded.
    pub stopped: Vec<(ProcessRecord, StopOutcome)>,
    /// Whether a `lab.json` was found.
    pub had_lab: bool,
    /// Whether the directory was removed (`--purge`).
    pub purged: bool,
}

/// Stops the daemons recorded in `dir`'s `lab.json`, each only if its pid still names the
/// recorded process, then removes `lab.json`; with `purge`, removes the lab directory.
pub fn down(dir: &Path, purge: bool) -> Result<DownReport> {
    let layout = Layout::new(dir)?;
    let mut report = DownReport {
        dir: layout.dir.clone(),
        stopped: Vec::new(),
        had_lab: false,
        purged: false,
    };
    // Not a lab's directory (or none at all): nothing to stop, and nothing is written.
    if !layout.marker().is_file() {
        return Ok(report);
    }
    let lock = DirLock::take(&layout)?;
    if let Some(state) = LabState::read(&layout)? {
        report.had_lab = true;
        let same_boot = process::boot_id()? == state.boot_id;
        let mut failures = Vec::new();
        // Reverse start order.
        for p in state.processes.iter().rev() {
            let outcome = if same_boot {
                match process::stop_recorded(&p.recorded()) {
                    Ok(o) => o,
                    Err(e) => {
                        failures.push(format!("{} (pid {}): {e}", p.name, p.pid));
                        continue;
                    }
                }
            } else {
                StopOutcome::AlreadyGone
            };
            report.stopped.push((p.clone(), outcome));
        }
        if !failures.is_empty() {
            return Err(Error::Other(format!(
                "could not stop: {}; {} kept",
                failures.join("; "),
                layout.state_file().display()
            )));
        }
        let path = layout.state_file();
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
    }
    if purge && layout.marker().is_file() {
        drop(lock);
        std::fs::remove_dir_all(&layout.dir).map_err(|e| Error::io(&layout.dir, e))?;
        report.purged = true;
    }
    Ok(report)
}

impl fmt::Display for DownReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.had_lab {
            writeln!(
                f,
                "nothing is running: no lab recorded in {}",
                self.dir.display()
            )?;
        }
        for (p, outcome) in &self.stopped {
            let what = match outcome {
                StopOutcome::Terminated => "stopped",
                StopOutcome::Killed => "killed (it ignored SIGTERM)",
                StopOutcome::AlreadyGone => "had already exited",
                StopOutcome::Reused => "not touched: the pid no longer names the recorded process",
            };
            writeln!(f, "{:<8} pid {:<7} {what}", p.name, p.pid)?;
        }
        if self.purged {
            writeln!(f, "removed {}", self.dir.display())?;
        } else if self.had_lab {
            writeln!(
                f,
                "the lab's files stay in {} (`carapace-lab down --purge` removes them)",
                self.dir.display()
            )?;
        }
        Ok(())
    }
}

/// What `status` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    /// The lab directory.
    pub dir: PathBuf,
    /// `lab.json`, if any.
    pub state: Option<LabState>,
    /// Each recorded daemon and whether it runs.
    pub processes: Vec<(ProcessRecord, Liveness)>,
}

impl StatusReport {
    /// Whether every recorded daemon runs (false when none is recorded).
    pub fn all_running(&self) -> bool {
        !self.processes.is_empty() && self.processes.iter().all(|(_, l)| *l == Liveness::Running)
    }
}

/// Which of the daemons recorded in `dir` run.
pub fn status(dir: &Path) -> Result<StatusReport> {
    let layout = Layout::new(dir)?;
    let state = LabState::read(&layout)?;
    let processes = match &state {
        None => Vec::new(),
        Some(s) => s
            .liveness()?
            .into_iter()
            .map(|(p, l)| (p.clone(), l))
            .collect(),
    };
    Ok(StatusReport {
        dir: layout.dir,
        state,
        processes,
    })
}

impl fmt::Display for StatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(state) = &self.state else {
            return writeln!(
                f,
                "nothing is running: no lab recorded in {}",
                self.dir.display()
            );
        };
        writeln!(
            f,
            "lab in {} (trust domain {}, server address {}, realm {})",
            self.dir.display(),
            state.trust_domain,
            state.server_address,
            state.realm
        )?;
        for (p, l) in &self.processes {
            let what = match l {
                Liveness::Running => "running",
                Liveness::Gone => "exited",
                Liveness::Reused => "exited (its pid names another process now)",
            };
            writeln!(
                f,
                "  {:<8} pid {:<7} {what:<8} {}  log {}",
                p.name,
                p.pid,
                p.serves,
                p.log.display()
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_survives_quotes_and_spaces() {
        assert_eq!(shell_quote("/tmp/lab"), "/tmp/lab");
        assert_eq!(shell_quote("/tmp/my lab"), "'/tmp/my lab'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn toml_strings_are_escaped() {
        for s in [r#"/tmp/a"b\c"#, "/tmp/it's", "/tmp/both'\"\n"] {
            let v: toml::Table = toml::from_str(&format!("k = {}", toml_str(s))).unwrap();
            assert_eq!(v["k"].as_str(), Some(s));
        }
    }

    #[test]
    fn a_non_lab_directory_is_never_claimed() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("precious"), "x").unwrap();
        let layout = Layout::new(tmp.path()).unwrap();
        let e = claim_dir(&layout).unwrap_err();
        assert!(e.to_string().contains("not empty"), "{e}");
        assert!(!layout.marker().exists());
        // An empty directory is claimed, and a lab's is recognised.
        let empty = Layout::new(&tmp.path().join("new")).unwrap();
        assert!(!claim_dir(&empty).unwrap());
        assert!(claim_dir(&empty).unwrap());
    }
}
