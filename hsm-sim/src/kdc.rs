//! A throwaway MIT Kerberos realm: a KDC on a free loopback port (UDP and TCP), its
//! database, principals and keytabs, all in one directory.
//!
//! Nothing reads /etc/krb5.conf or /etc/krb5kdc: every command the lab runs, and every
//! child a test starts, gets [`Kdc::envs`] (`KRB5_CONFIG`, `KRB5_KDC_PROFILE`,
//! `KRB5RCACHEDIR`). The current process's environment is never changed.
//!
//! Layout of the directory: `krb5.conf`, `kdc.conf`, `db/` (database and stash file),
//! `kdc.log`, `rcache/`, `ccache` (the default credential cache of `krb5.conf`, so that
//! a person's `kinit` and `klist` share it), and the keytabs the caller asks for.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::{self, Child, Detached, ProcessGroup, require};
use crate::{Error, Result};

/// The Debian packages of the KDC (`krb5kdc`, `kdb5_util`), `kadmin.local` and the
/// client tools (`kinit`, `kvno`, `klist`).
pub const KRB5_PACKAGES: &str = "krb5-kdc krb5-admin-server krb5-user";

/// How long a started KDC gets to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Start attempts with a fresh port when krb5kdc exits at start (a port taken meanwhile).
const START_ATTEMPTS: usize = 3;

/// A running MIT KDC for one realm. Dropping it stops krb5kdc (see [`Child`]) and
/// removes its temporary directory, if any.
#[derive(Debug)]
pub struct Kdc {
    // Field order matters: the daemon is stopped before its directory is removed.
    child: Child,
    admin: RealmAdmin,
    port: u16,
    _tmp: Option<TempDir>,
}

/// The administration of a lab realm (principals and keytabs through `kadmin.local`,
/// its paths and environment), usable by any process that knows the realm's directory:
/// a [`Kdc`] owns one, and a test child started by [`kdc_test`] opens one with
/// [`RealmAdmin::open`].
#[derive(Debug, Clone)]
pub struct RealmAdmin {
    realm: String,
    dir: PathBuf,
    tools: Tools,
}

#[derive(Debug, Clone)]
struct Tools {
    kadmin_local: PathBuf,
    klist: PathBuf,
}

/// The two principals of a lab realm and their keytabs (see
/// [`Kdc::provision_host_and_service`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabPrincipals {
    /// The node's principal, `host/node1.<realm in lowercase>@REALM`.
    pub host: String,
    /// Keytab holding [`LabPrincipals::host`] (mode 0600): what a node agent would use.
    pub host_keytab: PathBuf,
    /// The server's principal, `carapace/server.<realm in lowercase>@REALM`.
    pub service: String,
    /// Keytab holding [`LabPrincipals::service`] (mode 0600): what the server would use.
    pub service_keytab: PathBuf,
}

impl Kdc {
    /// Starts a KDC for `realm` in a new temporary directory, in the caller's process group.
    pub fn start(realm: &str) -> Result<Kdc> {
        let tmp = tempfile::Builder::new()
            .prefix("carapace-kdc-")
            .tempdir()
            .map_err(|e| Error::io(std::env::temp_dir(), e))?;
        let mut kdc = Kdc::start_in(tmp.path(), realm, ProcessGroup::Inherit)?;
        kdc._tmp = Some(tmp);
        Ok(kdc)
    }

    /// Creates the realm's database in `dir` (created if missing; it must not hold a
    /// database already) and starts `krb5kdc` on a free loopback port. Returns once the
    /// KDC accepts TCP connections.
    pub fn start_in(dir: &Path, realm: &str, group: ProcessGroup) -> Result<Kdc> {
        check_realm(realm)?;
        let krb5kdc = require("krb5kdc", KRB5_PACKAGES)?;
        let kdb5_util = require("kdb5_util", KRB5_PACKAGES)?;
        let tools = Tools {
            kadmin_local: require("kadmin.local", KRB5_PACKAGES)?,
            klist: require("klist", KRB5_PACKAGES)?,
        };
        crate::private_dir(dir)?;
        crate::private_dir(&dir.join("db"))?;
        crate::private_dir(&dir.join("rcache"))?;
        if dir.join("db").join("principal").exists() {
            return Err(Error::Other(format!(
                "{} already holds a Kerberos database",
                dir.display()
            )));
        }
        let envs = envs_for(dir);
        let mut last = None;
        for attempt in 0..START_ATTEMPTS {
            let port = process::free_tcp_udp_port()?;
            write_profiles(dir, realm, port)?;
            if attempt == 0 {
                // The master password only encrypts the database; the stash file holds the
                // key from now on. Given on stdin, so it never shows in the process list.
                let password = process::random_hex(24)?;
                let mut cmd = Command::new(&kdb5_util);
                cmd.args(["create", "-s", "-r", realm]).envs(envs.clone());
                let input = format!("{password}\n{password}\n");
                process::run(&mut cmd, Some(input.as_bytes()))?;
            }
            let mut cmd = Command::new(&krb5kdc);
            // -n: stay in the foreground, so the child's pid is the KDC's.
            cmd.args(["-n", "-r", realm]).envs(envs.clone());
            let mut child = Child::spawn("krb5kdc", &mut cmd, &dir.join("kdc.log"), group)?;
            match process::wait_ready(&mut child, READY_TIMEOUT, || process::tcp_answers(port)) {
                Ok(()) => {
                    return Ok(Kdc {
                        child,
                        admin: RealmAdmin {
                            realm: realm.to_owned(),
                            dir: dir.to_owned(),
                            tools,
                        },
                        port,
                        _tmp: None,
                    });
                }
                // Exited at start: most likely a port taken since we picked it.
                Err(e) if child.try_wait()?.is_some() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Other("krb5kdc did not start".into())))
    }

    /// The KDC's port on 127.0.0.1, UDP and TCP.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The KDC's log.
    pub fn log(&self) -> PathBuf {
        self.admin.dir.join("kdc.log")
    }

    /// The krb5kdc process's pid.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The krb5kdc process.
    pub fn child(&self) -> &Child {
        &self.child
    }

    /// Leaves krb5kdc running after this process exits (`carapace-lab up`); its
    /// directory is kept even if it was a temporary one.
    pub fn detach(self) -> Detached {
        if let Some(tmp) = self._tmp {
            let _ = tmp.keep();
        }
        self.child.detach()
    }

    /// The realm's administration (principals, keytabs, paths, environment).
    pub fn admin(&self) -> &RealmAdmin {
        &self.admin
    }

    /// The realm.
    pub fn realm(&self) -> &str {
        self.admin.realm()
    }

    /// The realm's directory.
    pub fn dir(&self) -> &Path {
        self.admin.dir()
    }

    /// The client profile (`KRB5_CONFIG`).
    pub fn krb5_conf(&self) -> PathBuf {
        self.admin.krb5_conf()
    }

    /// Environment for child processes that use this realm (see [`RealmAdmin::envs`]).
    pub fn envs(&self) -> Vec<(String, String)> {
        self.admin.envs()
    }

    /// See [`RealmAdmin::principal`].
    pub fn principal(&self, name: &str) -> String {
        self.admin.principal(name)
    }

    /// See [`RealmAdmin::add_principal`].
    pub fn add_principal(&self, name: &str) -> Result<()> {
        self.admin.add_principal(name)
    }

    /// See [`RealmAdmin::keytab`].
    pub fn keytab(&self, principals: &[&str], path: &Path) -> Result<PathBuf> {
        self.admin.keytab(principals, path)
    }

    /// See [`RealmAdmin::provision_host_and_service`].
    pub fn provision_host_and_service(&self) -> Result<LabPrincipals> {
        self.admin.provision_host_and_service()
    }
}

impl RealmAdmin {
    /// The administration of realm `realm`, whose database and profiles are in `dir`
    /// (a [`Kdc`]'s directory, possibly of another process).
    pub fn open(dir: &Path, realm: &str) -> Result<RealmAdmin> {
        check_realm(realm)?;
        Ok(RealmAdmin {
            realm: realm.to_owned(),
            dir: dir.to_owned(),
            tools: Tools {
                kadmin_local: require("kadmin.local", KRB5_PACKAGES)?,
                klist: require("klist", KRB5_PACKAGES)?,
            },
        })
    }

    /// The realm.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The realm's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The client profile (`KRB5_CONFIG`).
    pub fn krb5_conf(&self) -> PathBuf {
        self.dir.join("krb5.conf")
    }

    /// The KDC profile (`KRB5_KDC_PROFILE`).
    pub fn kdc_profile(&self) -> PathBuf {
        self.dir.join("kdc.conf")
    }

    /// The replay cache directory (`KRB5RCACHEDIR`): without it, an acceptor writes
    /// `/var/tmp/krb5_<uid>.rcache2`, outside the lab.
    pub fn rcache_dir(&self) -> PathBuf {
        self.dir.join("rcache")
    }

    /// Environment for child processes that use this realm: `KRB5_CONFIG`,
    /// `KRB5_KDC_PROFILE`, `KRB5RCACHEDIR`.
    pub fn envs(&self) -> Vec<(String, String)> {
        envs_for(&self.dir)
    }

    /// The full name of `name` (`name@REALM` unless it names a realm already).
    pub fn principal(&self, name: &str) -> String {
        if name.contains('@') {
            name.to_owned()
        } else {
            format!("{name}@{}", self.realm)
        }
    }

    /// Adds `name` (`primary/instance`, optionally `@REALM`) with a random key.
    pub fn add_principal(&self, name: &str) -> Result<()> {
        check_principal(name)?;
        let full = self.principal(name);
        // kadmin.local exits 0 even when a query fails: success is its own message.
        let out = self.kadmin(&format!("addprinc -randkey {full}"))?;
        let created = format!("Principal \"{full}\" created.");
        if out.contains(&created) {
            Ok(())
        } else {
            Err(Error::Other(format!("adding principal {full}: {out}")))
        }
    }

    /// Writes a new keytab at `path` (mode 0600; it must not exist) with the current keys
    /// of `principals`. The keys are not changed (`ktadd -norandkey`), so several keytabs
    /// of one principal all stay valid.
    pub fn keytab(&self, principals: &[&str], path: &Path) -> Result<PathBuf> {
        if principals.is_empty() {
            return Err(Error::Other("a keytab needs at least one principal".into()));
        }
        let shown = path.display().to_string();
        if shown.contains('"') || shown.contains('\\') {
            return Err(Error::Other(format!(
                "{shown}: kadmin.local cannot take a keytab path with a quote or backslash"
            )));
        }
        if path.exists() {
            return Err(Error::Other(format!("{shown} exists already")));
        }
        let mut names = Vec::with_capacity(principals.len());
        for p in principals {
            check_principal(p)?;
            names.push(self.principal(p));
        }
        // The only quoting kadmin.local's query parser knows is "...".
        let out = self.kadmin(&format!(
            "ktadd -norandkey -k \"{shown}\" {}",
            names.join(" ")
        ))?;
        // Check what the keytab holds rather than trusting kadmin.local's exit status.
        let mut cmd = Command::new(&self.tools.klist);
        cmd.arg("-k").arg(path).envs(self.envs());
        let listed = process::combined(
            &process::run(&mut cmd, None)
                .map_err(|e| Error::Other(format!("writing keytab {shown}: {out}\n{e}")))?,
        );
        for name in &names {
            if !listed.split_whitespace().any(|w| w == name) {
                return Err(Error::Other(format!("keytab {shown} lacks {name}: {out}")));
            }
        }
        crate::set_mode(path, 0o600)?;
        Ok(path.to_owned())
    }

    /// Adds `host/node1.<realm lowercase>` and `carapace/server.<realm lowercase>` and
    /// writes their keytabs, `host.keytab` and `service.keytab`, into the realm's
    /// directory: a node and the server of a lab.
    pub fn provision_host_and_service(&self) -> Result<LabPrincipals> {
        let names = self.lab_principals();
        self.add_principal(&names.host)?;
        self.add_principal(&names.service)?;
        self.keytab(&[&names.host], &names.host_keytab)?;
        self.keytab(&[&names.service], &names.service_keytab)?;
        Ok(names)
    }

    /// The names and keytab paths [`RealmAdmin::provision_host_and_service`] uses.
    pub fn lab_principals(&self) -> LabPrincipals {
        let domain = self.realm.to_ascii_lowercase();
        LabPrincipals {
            host: self.principal(&format!("host/node1.{domain}")),
            host_keytab: self.dir.join("host.keytab"),
            service: self.principal(&format!("carapace/server.{domain}")),
            service_keytab: self.dir.join("service.keytab"),
        }
    }

    /// Sets the longest ticket lifetime of `name` (`modprinc -maxlife`), e.g. to make
    /// tickets that expire within a test.
    pub fn set_max_life(&self, name: &str, seconds: u32) -> Result<()> {
        check_principal(name)?;
        let full = self.principal(name);
        let out = self.kadmin(&format!("modprinc -maxlife \"{seconds} seconds\" {full}"))?;
        if out.contains(&format!("Principal \"{full}\" modified.")) {
            Ok(())
        } else {
            Err(Error::Other(format!("modprinc {full}: {out}")))
        }
    }

    /// Deletes `name` from the realm: its keytabs stop working at the next ticket
    /// request (a host leaving the realm).
    pub fn delete_principal(&self, name: &str) -> Result<()> {
        check_principal(name)?;
        let full = self.principal(name);
        let out = self.kadmin(&format!("delprinc -force {full}"))?;
        if out.contains(&format!("Principal \"{full}\" deleted.")) {
            Ok(())
        } else {
            Err(Error::Other(format!("delprinc {full}: {out}")))
        }
    }

    fn kadmin(&self, query: &str) -> Result<String> {
        let mut cmd = Command::new(&self.tools.kadmin_local);
        cmd.arg("-q").arg(query).envs(self.envs());
        Ok(process::combined(&process::run(&mut cmd, None)?))
    }
}

/// Environment variable holding the lab realm's directory in a [`kdc_test`] child.
pub const ENV_KDC_DIR: &str = "HSM_SIM_KDC_DIR";
/// Environment variable holding the lab realm's name in a [`kdc_test`] child.
pub const ENV_KDC_REALM: &str = "HSM_SIM_KDC_REALM";

/// What a test sees in its [`kdc_test`] child: the realm's administration and the
/// host and service principals with their keytabs.
#[derive(Debug, Clone)]
pub struct ChildRealm {
    /// Principals and keytabs of the running realm.
    pub admin: RealmAdmin,
    /// `host/node1.<domain>` and `carapace/server.<domain>` with their keytabs.
    pub principals: LabPrincipals,
}

/// Runs a test against its own MIT realm, in a child process whose environment points
/// krb5 at the realm from the start (`KRB5_CONFIG`, `KRB5_KDC_PROFILE`, `KRB5RCACHEDIR`):
/// libkrb5 reads them in every call, and changing a running test's environment is
/// unsound.
///
/// The parent starts a [`Kdc`] for `realm`, provisions the host and service principals
/// ([`RealmAdmin::provision_host_and_service`]), runs the test again in a child (see
/// [`crate::process::run_test_in_child`]), stops the KDC and returns `None`. The child
/// gets `Some` with the realm's administration.
#[allow(
    clippy::panic,
    reason = "a test helper: a missing package or a failed child must fail the calling test"
)]
pub fn kdc_test(test_name: &str, realm: &str) -> Option<ChildRealm> {
    if crate::process::is_test_child(test_name) {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|e| panic!("kdc_test child: {name}: {e}"))
        };
        let admin = RealmAdmin::open(Path::new(&var(ENV_KDC_DIR)), &var(ENV_KDC_REALM))
            .unwrap_or_else(|e| panic!("kdc_test child: {e}"));
        let principals = admin.lab_principals();
        return Some(ChildRealm { admin, principals });
    }
    let kdc = Kdc::start(realm).unwrap_or_else(|e| panic!("kdc_test: {e}"));
    kdc.provision_host_and_service()
        .unwrap_or_else(|e| panic!("kdc_test: {e}"));
    let mut envs = kdc.envs();
    envs.push((ENV_KDC_DIR.to_owned(), kdc.dir().display().to_string()));
    envs.push((ENV_KDC_REALM.to_owned(), realm.to_owned()));
    crate::process::run_test_in_child("kdc_test", test_name, &envs);
    None
}

fn write_profiles(dir: &Path, realm: &str, port: u16) -> Result<()> {
    let domain = realm.to_ascii_lowercase();
    let d = |name: &str| dir.join(name).display().to_string();
    // krb5 profiles expand no variables: every path is written out.
    crate::write_file(
        &dir.join("krb5.conf"),
        &format!(
            "# Written by carapace-lab: the client side of the lab realm {realm}.\n\
             [libdefaults]\n\
             \x20   default_realm = {realm}\n\
             \x20   dns_lookup_kdc = false\n\
             \x20   dns_lookup_realm = false\n\
             \x20   dns_canonicalize_hostname = false\n\
             \x20   rdns = false\n\
             \x20   default_ccache_name = FILE:{ccache}\n\
             \x20   udp_preference_limit = 1\n\
             [realms]\n\
             \x20   {realm} = {{\n\
             \x20       kdc = 127.0.0.1:{port}\n\
             \x20   }}\n\
             [domain_realm]\n\
             \x20   .{domain} = {realm}\n\
             \x20   {domain} = {realm}\n",
            ccache = d("ccache"),
        ),
    )?;
    crate::write_file(
        &dir.join("kdc.conf"),
        &format!(
            "# Written by carapace-lab: the KDC of the lab realm {realm} (no kadmind).\n\
             [kdcdefaults]\n\
             \x20   kdc_listen = 127.0.0.1:{port}\n\
             \x20   kdc_tcp_listen = 127.0.0.1:{port}\n\
             [realms]\n\
             \x20   {realm} = {{\n\
             \x20       database_name = {db}\n\
             \x20       key_stash_file = {stash}\n\
             \x20       acl_file = {acl}\n\
             \x20       max_life = 10h 0m 0s\n\
             \x20       max_renewable_life = 1d 0h 0m 0s\n\
             \x20       supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal\n\
             \x20   }}\n\
             [logging]\n\
             \x20   kdc = FILE:{log}\n\
             \x20   default = FILE:{log}\n",
            db = d("db/principal"),
            stash = d("db/stash"),
            acl = d("kadm5.acl"),
            log = d("kdc.log"),
        ),
    )
}

/// The environment that points krb5 tools at the realm in `dir`.
fn envs_for(dir: &Path) -> Vec<(String, String)> {
    [
        ("KRB5_CONFIG", "krb5.conf"),
        ("KRB5_KDC_PROFILE", "kdc.conf"),
        ("KRB5RCACHEDIR", "rcache"),
    ]
    .into_iter()
    .map(|(var, file)| (var.to_owned(), dir.join(file).display().to_string()))
    .collect()
}

/// A realm name: uppercase letters, digits, `.` and `-`.
pub(crate) fn check_realm(realm: &str) -> Result<()> {
    let ok = !realm.is_empty()
        && realm
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Other(format!(
            "realm {realm:?}: use uppercase letters, digits, '.' and '-' (e.g. LAB.TEST)"
        )))
    }
}

/// A principal name safe to put into a kadmin.local query: no spaces, quotes or
/// anything else its parser would interpret.
fn check_principal(name: &str) -> Result<()> {
    // The first character is alphanumeric so that no name reads as an option (`-pw`).
    let ok = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"./@-_".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Other(format!(
            "principal {name:?}: use letters, digits and . / @ - _, starting with a letter or digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_inject_into_a_kadmin_query_are_refused() {
        assert!(check_principal("host/node1.lab.test@LAB.TEST").is_ok());
        for bad in ["", "a b", "a\"b", "a;b", "x\ny", "-pw", "/x"] {
            assert!(check_principal(bad).is_err(), "{bad:?}");
        }
        assert!(check_realm("LAB.TEST").is_ok());
        assert!(check_realm("lab.test").is_err());
        assert!(check_realm("LAB TEST").is_err());
    }
}
