//! KDC fixture: a realm on a free loopback port whose keytabs get tickets, and whose
//! krb5kdc is stopped with its guard.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Instant;

use hsm_sim::kdc::Kdc;
use hsm_sim::process::ProcInfo;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {text}");
    text
}

#[test]
fn a_host_keytab_gets_a_ticket_for_the_service() {
    let t = Instant::now();
    let kdc = Kdc::start("LAB.TEST").unwrap();
    eprintln!("KDC start: {:?}", t.elapsed());
    let t = Instant::now();
    let p = kdc.provision_host_and_service().unwrap();
    eprintln!("principals and keytabs: {:?}", t.elapsed());
    assert_eq!(p.host, "host/node1.lab.test@LAB.TEST");
    assert_eq!(p.service, "carapace/server.lab.test@LAB.TEST");
    for keytab in [&p.host_keytab, &p.service_keytab] {
        let mode = std::fs::metadata(keytab).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", keytab.display());
    }

    let cc = format!("FILE:{}", kdc.dir().join("test.cc").display());
    run(Command::new("kinit")
        .envs(kdc.envs())
        .env("KRB5CCNAME", &cc)
        .arg("-kt")
        .arg(&p.host_keytab)
        .arg(&p.host));
    let kvno = run(Command::new("kvno")
        .envs(kdc.envs())
        .env("KRB5CCNAME", &cc)
        .arg(&p.service));
    assert!(kvno.contains("kvno = 1"), "{kvno}");

    // The service keytab holds the key the ticket was made for (-norandkey kept it).
    let listed = run(Command::new("klist")
        .envs(kdc.envs())
        .arg("-k")
        .arg(&p.service_keytab));
    assert!(listed.contains(&p.service), "{listed}");

    // A second keytab of the same principal does not invalidate the first.
    let again = kdc
        .keytab(&[&p.host], &kdc.dir().join("host-again.keytab"))
        .unwrap();
    run(Command::new("kinit")
        .envs(kdc.envs())
        .env("KRB5CCNAME", &cc)
        .arg("-kt")
        .arg(&p.host_keytab)
        .arg(&p.host));
    run(Command::new("kinit")
        .envs(kdc.envs())
        .env("KRB5CCNAME", &cc)
        .arg("-kt")
        .arg(&again)
        .arg(&p.host));

    let pid = kdc.pid();
    let dir = kdc.dir().to_owned();
    drop(kdc);
    assert!(
        ProcInfo::of(pid).unwrap().is_none(),
        "krb5kdc {pid} still there"
    );
    assert!(!dir.exists());
}

#[test]
fn unknown_principals_and_bad_names_are_errors() {
    let kdc = Kdc::start("EXAMPLE.TEST").unwrap();
    let e = kdc
        .keytab(&["nobody/here"], &kdc.dir().join("x.keytab"))
        .unwrap_err();
    assert!(e.to_string().contains("nobody/here"), "{e}");
    assert!(kdc.add_principal("a b").is_err());
    assert!(kdc.add_principal("-pw").is_err());
    kdc.add_principal("svc/x.example.test").unwrap();
    // kadmin.local exits 0 on a duplicate: the fixture still reports it.
    assert!(kdc.add_principal("svc/x.example.test").is_err());
    assert!(Kdc::start("lower.case").is_err());
}
