//! The admin socket cannot be impersonated: the server refuses a socket path another
//! user could change (and chmods nothing it did not create), and the CLI sends nothing to
//! a socket served by another uid than its own or `--server-uid`.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: failing loudly is the point"
)]

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use carapace_e2e::{Lab, Proc, bin, free_port, my_uid, patience};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Starts a server with `admin_socket` and returns its exit status and log.
fn server_with_admin_socket(lab: &Lab, name: &str, admin_socket: &Path) -> (bool, String) {
    let mut cmd = Command::new(bin("carapace-server"));
    cmd.arg("run")
        .arg("--data-dir")
        .arg(lab.path().join(name))
        .arg("--admin-socket")
        .arg(admin_socket)
        .arg("--bind-address")
        .arg(format!("127.0.0.1:{}", free_port()));
    let mut p = Proc::spawn(
        "carapace-server",
        cmd,
        lab.path().join(format!("{name}.log")),
    );
    let status = p.wait_exit(patience()).unwrap_or_else(|| {
        panic!(
            "carapace-server did not refuse {}:\n{}",
            admin_socket.display(),
            p.log()
        )
    });
    (status.success(), p.log())
}

#[test]
fn the_server_refuses_an_admin_socket_path_others_could_change_and_chmods_nothing() {
    assert_eq!(
        my_uid(),
        0,
        "this test makes directories of uid 65534 and must run as root (CI does)"
    );
    let lab = Lab::new();
    // Another user pre-created the directory (the /tmp/carapace-server attack).
    let theirs = lab.path().join("carapace-server");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let (ok, log) = server_with_admin_socket(&lab, "a", &theirs.join("private/admin.sock"));
    assert!(!ok, "{log}");
    assert!(
        log.contains(&format!("{} is owned by uid 65534", theirs.display())),
        "{log}"
    );
    assert!(
        !theirs.join("private").exists(),
        "something was created in their directory"
    );

    // A world-writable sticky directory as the socket's own (root with
    // --admin-socket /tmp/admin.sock): refused, its mode unchanged.
    let shared = lab.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let (ok, log) = server_with_admin_socket(&lab, "b", &shared.join("admin.sock"));
    assert!(!ok, "{log}");
    assert!(log.contains("has mode 1777"), "{log}");
    assert_eq!(
        mode(&shared),
        0o1777,
        "the server chmodded a directory it did not create"
    );
    assert!(!shared.join("admin.sock").exists());

    // A group-writable directory on the way.
    let group = lab.path().join("group");
    std::fs::create_dir(&group).unwrap();
    std::fs::set_permissions(&group, std::fs::Permissions::from_mode(0o775)).unwrap();
    let (ok, log) = server_with_admin_socket(&lab, "c", &group.join("private/admin.sock"));
    assert!(!ok, "{log}");
    assert!(
        log.contains(&format!("{} has mode 775", group.display())),
        "{log}"
    );
    assert_eq!(mode(&group), 0o775);
    assert!(!group.join("private").exists());
}

/// A fake admin server run as uid 65534: listens on `socket`, and for each of `count`
/// connections prints how many bytes the client sent before closing.
const FAKE_SERVER: &str = r#"
import os, socket, sys
path, count = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX)
s.bind(path)
os.chmod(path, 0o777)
s.listen(4)
print("ready", flush=True)
for _ in range(count):
    c, _ = s.accept()
    c.settimeout(3)
    n = 0
    try:
        while True:
            b = c.recv(4096)
            if not b:
                break
            n += len(b)
    except OSError:
        pass
    c.close()
    print(n, flush=True)
"#;

#[test]
fn the_cli_sends_nothing_to_an_admin_socket_served_by_another_uid() {
    assert_eq!(
        my_uid(),
        0,
        "this test runs a fake server as uid 65534 and must run as root (CI does)"
    );
    let lab = Lab::new();
    let theirs = lab.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let fake_socket = theirs.join("fake.sock");
    let mut fake = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(FAKE_SERVER)
        .arg(&fake_socket)
        .arg("2")
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufRead::lines(std::io::BufReader::new(fake.stdout.take().unwrap()));
    assert_eq!(out.next().unwrap().unwrap(), "ready");
    // The impostor's socket ends up where the CLI expects the server's, in a private
    // root-owned directory (the path check passes: only the peer check is left).
    let admin_dir = lab.path().join("admin");
    std::fs::create_dir(&admin_dir).unwrap();
    std::fs::set_permissions(&admin_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let admin_socket = admin_dir.join("admin.sock");
    std::fs::rename(&fake_socket, &admin_socket).unwrap();

    let run = |extra: &[&str]| {
        Command::new(bin("carapace-server"))
            .args(["token", "generate", "--admin-socket"])
            .arg(&admin_socket)
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = run(&[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("served by a process of uid 65534, not uid 0")
            && stderr.contains("--server-uid 65534"),
        "{stderr}"
    );
    assert_eq!(
        out.next().unwrap().unwrap(),
        "0",
        "the CLI sent bytes to the impostor"
    );

    // Told that the server runs as 65534, the CLI talks to it (and sends its request):
    // the refusal above came from the peer check.
    let started = Instant::now();
    let _ = run(&["--server-uid", "65534"]);
    let sent: usize = out.next().unwrap().unwrap().parse().unwrap();
    assert!(
        sent > 0,
        "with --server-uid the CLI should have sent its request"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    let _ = fake.wait();
}
