//! SoftHSM2 for the benchmarks that put a server key in a token (B3, B8): the token's raw
//! signing rate, measured in a child process, and the server's `[key_manager.pkcs11]`
//! config.
//!
//! - The raw rate: [`Pkcs11KeyManager::raw_sign_rate`] (`CKM_ECDSA` on a precomputed
//!   P-256 digest, one logged-in session per thread, nothing else running). SoftHSM2 reads
//!   `SOFTHSM2_CONF` from the process environment when the module is initialised, and this
//!   crate does not change its own environment, so the measurement runs in a child:
//!   `carapace-bench --pkcs11-raw ...` ([`RawArgs`], [`raw_child`]) started by
//!   [`raw_rates`] with `SOFTHSM2_CONF` in its environment; it prints one JSON line.
//! - The server: [`server_options`] writes a config file with `[key_manager.pkcs11]` (the
//!   server then generates its CA, JWT and TLS keys in the token) and gives the
//!   environment that points SoftHSM2 at the token.
//! - [`session_counts`]: the session (and raw thread) counts measured, 1 and every core.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use carapace_core::KeyType;
use carapace_core::plugin::KeyManager as _;
use carapace_keymanager_pkcs11::{Pkcs11Config, Pkcs11KeyManager};
use hsm_sim::softhsm::{SoftHsm, Token};

use crate::harness::ServerOptions;
use crate::process;

/// What a benchmark needing SoftHSM2 says when it is missing.
pub const NEEDS_SOFTHSM: &str =
    "needs SoftHSM2 (softhsm2-util and libsofthsm2.so: apt-get install -y softhsm2)";

/// The session (and raw thread) counts measured: 1 and every core (at most the key
/// manager's session limit).
pub fn session_counts(nproc: usize) -> Vec<usize> {
    let n = nproc.clamp(1, carapace_keymanager_pkcs11::MAX_SESSIONS);
    if n > 1 { vec![1, n] } else { vec![1] }
}

/// The first argument that selects the hidden raw-rate mode of `carapace-bench`.
pub const RAW_MODE_FLAG: &str = "--pkcs11-raw";

/// The key id the raw-rate child generates (label `bench-raw` with its prefix).
const RAW_KEY_ID: &str = "raw";

/// Arguments of the raw-rate child:
/// `--pkcs11-raw --module M --token-label L --pin-file F --threads 1,2 --runs R --seconds S`.
#[derive(Debug, Clone, PartialEq)]
pub struct RawArgs {
    /// The PKCS#11 module.
    pub module: PathBuf,
    /// The token label.
    pub token_label: String,
    /// The file holding the user PIN (mode 0600).
    pub pin_file: PathBuf,
    /// The thread counts to measure (each run measures all of them, in this order).
    pub threads: Vec<usize>,
    /// Runs per thread count.
    pub runs: usize,
    /// Length of one run, in seconds.
    pub seconds: f64,
}

impl RawArgs {
    /// Parses the arguments after [`RAW_MODE_FLAG`].
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<RawArgs> {
        let (mut module, mut label, mut pin) = (None, None, None);
        let (mut threads, mut runs, mut seconds) = (vec![1], 1, 1.0);
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            let mut value = || it.next().ok_or_else(|| anyhow!("{a} needs a value"));
            match a.as_str() {
                "--module" => module = Some(PathBuf::from(value()?)),
                "--token-label" => label = Some(value()?),
                "--pin-file" => pin = Some(PathBuf::from(value()?)),
                "--threads" => {
                    threads = value()?
                        .split(',')
                        .map(|t| t.trim().parse::<usize>())
                        .collect::<Result<_, _>>()
                        .context("--threads: a comma-separated list of counts")?;
                }
                "--runs" => runs = value()?.parse().context("--runs")?,
                "--seconds" => seconds = value()?.parse().context("--seconds")?,
                other => bail!("{RAW_MODE_FLAG}: unknown argument {other:?}"),
            }
        }
        if threads.is_empty() || threads.contains(&0) {
            bail!("--threads: every count must be at least 1");
        }
        if !(seconds > 0.0 && seconds <= 600.0) {
            bail!("--seconds: {seconds} is not between 0 and 600");
        }
        Ok(RawArgs {
            module: module.ok_or_else(|| anyhow!("--module is required"))?,
            token_label: label.ok_or_else(|| anyhow!("--token-label is required"))?,
            pin_file: pin.ok_or_else(|| anyhow!("--pin-file is required"))?,
            threads,
            runs: runs.max(1),
            seconds,
        })
    }

    /// The command line (after the program name) that [`RawArgs::parse`] reads back.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![RAW_MODE_FLAG.into(), "--module".into()];
        v.push(self.module.clone().into());
        v.push("--token-label".into());
        v.push(self.token_label.clone().into());
        v.push("--pin-file".into());
        v.push(self.pin_file.clone().into());
        v.push("--threads".into());
        v.push(
            self.threads
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(",")
                .into(),
        );
        v.push("--runs".into());
        v.push(self.runs.to_string().into());
        v.push("--seconds".into());
        v.push(self.seconds.to_string().into());
        v
    }
}

/// One raw-rate run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RawRun {
    /// Signatures per second.
    pub rate: f64,
    /// CPU time of the measuring process (user + system, all threads) per signature, µs.
    pub cpu_us_per_sig: f64,
    /// Average number of idle cores on the machine during the run (`/proc/stat`).
    pub idle_cores: f64,
}

impl RawRun {
    /// Average number of cores the token kept busy: signatures/s × CPU per signature.
    pub fn busy_cores(&self) -> f64 {
        self.rate * self.cpu_us_per_sig / 1e6
    }
}

/// The raw rate at one thread count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawRate {
    /// Threads, each with its own logged-in session.
    pub threads: usize,
    /// The runs.
    pub runs: Vec<RawRun>,
}

impl RawRate {
    /// Signatures/s of each run.
    pub fn rates(&self) -> Vec<f64> {
        self.runs.iter().map(|r| r.rate).collect()
    }

    /// CPU-µs per signature of each run.
    pub fn cpu(&self) -> Vec<f64> {
        self.runs.iter().map(|r| r.cpu_us_per_sig).collect()
    }

    /// Cores kept busy in each run.
    pub fn busy(&self) -> Vec<f64> {
        self.runs.iter().map(RawRun::busy_cores).collect()
    }

    /// Idle cores on the machine in each run.
    pub fn idle(&self) -> Vec<f64> {
        self.runs.iter().map(|r| r.idle_cores).collect()
    }
}

/// What the child prints (one JSON line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawOutput {
    /// By thread count, in the order asked.
    pub rates: Vec<RawRate>,
}

/// The raw-rate child: opens the token (as many sessions as the largest thread count),
/// generates a P-256 key (or takes the one an earlier run left), warms up, then measures every thread count `runs` times
/// (alternating). Must run in a process whose environment has `SOFTHSM2_CONF`.
pub fn raw_child(args: &RawArgs) -> Result<RawOutput> {
    let sessions = args.threads.iter().copied().max().unwrap_or(1);
    let cfg = Pkcs11Config {
        module: args.module.clone(),
        token_label: Some(args.token_label.clone()),
        pin_file: Some(args.pin_file.clone()),
        key_label_prefix: Some("bench-".into()),
        sessions: Some(sessions),
        ..Pkcs11Config::default()
    };
    let km = Pkcs11KeyManager::open(&cfg).map_err(|e| anyhow!("{e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if rt.block_on(km.get_key(RAW_KEY_ID)).is_err() {
        rt.block_on(km.generate_key(RAW_KEY_ID, KeyType::EcP256))
            .map_err(|e| anyhow!("generating the P-256 key: {e}"))?;
    }
    let run_for = Duration::from_secs_f64(args.seconds);
    // Warm-up: sessions, key handles, CPU frequency.
    km.raw_sign_rate(
        RAW_KEY_ID,
        sessions,
        run_for.min(Duration::from_millis(300)),
    )
    .map_err(|e| anyhow!("warm-up: {e}"))?;
    let me = std::process::id();
    let mut out: Vec<RawRate> = args
        .threads
        .iter()
        .map(|&threads| RawRate {
            threads,
            runs: Vec::new(),
        })
        .collect();
    for _ in 0..args.runs {
        for r in &mut out {
            let cpu0 = process::cpu_time(me)?;
            let idle0 = process::machine_idle()?;
            let t = Instant::now();
            let rate = km
                .raw_sign_rate(RAW_KEY_ID, r.threads, run_for)
                .map_err(|e| anyhow!("raw_sign_rate({} threads): {e}", r.threads))?;
            let wall = t.elapsed();
            let cpu = process::cpu_time(me)?.saturating_sub(cpu0);
            let idle = process::machine_idle()?.saturating_sub(idle0);
            let sigs = (rate * wall.as_secs_f64()).max(1.0);
            r.runs.push(RawRun {
                rate,
                cpu_us_per_sig: cpu.as_secs_f64() * 1e6 / sigs,
                idle_cores: idle.as_secs_f64() / wall.as_secs_f64().max(f64::EPSILON),
            });
        }
    }
    Ok(RawOutput { rates: out })
}

/// Runs the raw-rate child (this executable with [`RAW_MODE_FLAG`]) with the
/// environment of `hsm`, on `token`, and reads its JSON line. The child is killed if the
/// future is dropped.
pub async fn raw_rates(
    hsm: &SoftHsm,
    token: &Token,
    threads: &[usize],
    runs: usize,
    seconds: f64,
) -> Result<Vec<RawRate>> {
    let args = RawArgs {
        module: hsm.module().to_path_buf(),
        token_label: token.label.clone(),
        pin_file: token.pin_file.clone(),
        threads: threads.to_vec(),
        runs,
        seconds,
    };
    let exe = std::env::current_exe().context("locating this executable")?;
    let out = tokio::process::Command::new(&exe)
        .args(args.to_args())
        .envs(hsm.envs())
        // Errors are reported in the benchmark report: no backtraces there.
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {} {RAW_MODE_FLAG}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "{} {RAW_MODE_FLAG} failed ({}): {}",
            exe.display(),
            out.status,
            stderr.trim()
        );
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| anyhow!("{RAW_MODE_FLAG} printed no JSON line: {stdout}{stderr}"))?;
    let parsed: RawOutput = serde_json::from_str(line)
        .with_context(|| format!("{RAW_MODE_FLAG} output is not the expected JSON: {line}"))?;
    Ok(parsed.rates)
}

/// The server's `[key_manager.pkcs11]` config file text.
pub fn server_config_text(module: &Path, token: &Token, sessions: usize) -> Result<String> {
    let mut pkcs11 = toml::Table::new();
    pkcs11.insert(
        "module".into(),
        toml::Value::String(module.to_string_lossy().into_owned()),
    );
    pkcs11.insert(
        "token_label".into(),
        toml::Value::String(token.label.clone()),
    );
    pkcs11.insert(
        "pin_file".into(),
        toml::Value::String(token.pin_file.to_string_lossy().into_owned()),
    );
    pkcs11.insert(
        "sessions".into(),
        toml::Value::Integer(i64::try_from(sessions)?),
    );
    let mut km = toml::Table::new();
    km.insert("pkcs11".into(), toml::Value::Table(pkcs11));
    let mut root = toml::Table::new();
    root.insert("key_manager".into(), toml::Value::Table(km));
    Ok(toml::to_string(&root)?)
}

/// Writes `<dir>/server.toml` with `[key_manager.pkcs11]` for `token` and `sessions`,
/// and returns the options that start the server with it and with `SOFTHSM2_CONF`.
pub fn server_options(
    dir: &Path,
    hsm: &SoftHsm,
    token: &Token,
    sessions: usize,
) -> Result<ServerOptions> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("server.toml");
    std::fs::write(&path, server_config_text(hsm.module(), token, sessions)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(ServerOptions {
        config: Some(path),
        envs: hsm.envs(),
    })
}

/// SoftHSM2's version (`softhsm2-util --version`) and the crypto library its module is
/// linked against (from `ldd`), for the report.
pub fn softhsm_description(module: &Path) -> String {
    let version = std::process::Command::new("softhsm2-util")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let out = String::from_utf8_lossy(&o.stdout);
            Some(out.lines().next()?.trim().to_owned())
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let backend = std::process::Command::new("ldd")
        .arg(module)
        .output()
        .ok()
        .and_then(|o| crypto_backend(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_else(|| "crypto backend unknown".into());
    format!("SoftHSM2 {version} ({}, {backend})", module.display())
}

/// The crypto library in `ldd` output: OpenSSL's libcrypto or Botan.
pub fn crypto_backend(ldd: &str) -> Option<String> {
    ldd.lines().find_map(|l| {
        let name = l.split_whitespace().next()?;
        if name.starts_with("libcrypto.so") {
            Some(format!("OpenSSL {name}"))
        } else if name.starts_with("libbotan") {
            Some(format!("Botan {name}"))
        } else {
            None
        }
    })
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_args_round_trip() {
        let a = RawArgs {
            module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            token_label: "bench-raw".into(),
            pin_file: "/tmp/x/bench-raw.pin".into(),
            threads: vec![1, 2],
            runs: 3,
            seconds: 1.5,
        };
        let args: Vec<String> = a
            .to_args()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(args[0], RAW_MODE_FLAG);
        assert_eq!(RawArgs::parse(args.into_iter().skip(1)).unwrap(), a);
        assert!(RawArgs::parse(["--module".to_owned(), "/m".to_owned()]).is_err());
        assert!(
            RawArgs::parse(
                [
                    "--module",
                    "/m",
                    "--token-label",
                    "t",
                    "--pin-file",
                    "/p",
                    "--threads",
                    "0"
                ]
                .map(str::to_owned)
            )
            .is_err()
        );
        assert!(RawArgs::parse(["--bogus".to_owned()]).is_err());
    }

    #[test]
    fn raw_output_is_one_json_line() {
        let o = RawOutput {
            rates: vec![RawRate {
                threads: 2,
                runs: vec![RawRun {
                    rate: 1250.0,
                    cpu_us_per_sig: 800.0,
                    idle_cores: 0.5,
                }],
            }],
        };
        let line = serde_json::to_string(&o).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<RawOutput>(&line).unwrap(), o);
        assert_eq!(o.rates[0].rates(), vec![1250.0]);
        assert_eq!(o.rates[0].cpu(), vec![800.0]);
        assert_eq!(o.rates[0].busy(), vec![1.0]);
        assert_eq!(o.rates[0].idle(), vec![0.5]);
    }

    #[test]
    fn server_config_is_a_pkcs11_key_manager_section() {
        let token = Token {
            label: "bench-s2".into(),
            serial: "0123456789abcdef".into(),
            user_pin: "deadbeef00000001".into(),
            so_pin: "deadbeef00000002".into(),
            pin_file: "/tmp/a \"b\"/bench-s2.pin".into(),
        };
        let text =
            server_config_text(Path::new("/usr/lib/softhsm/libsofthsm2.so"), &token, 2).unwrap();
        assert!(!text.contains("deadbeef"), "no PIN in the file: {text}");
        let v: toml::Table = toml::from_str(&text).unwrap();
        let p = &v["key_manager"]["pkcs11"];
        assert_eq!(
            p["module"].as_str(),
            Some("/usr/lib/softhsm/libsofthsm2.so")
        );
        assert_eq!(p["token_label"].as_str(), Some("bench-s2"));
        assert_eq!(p["pin_file"].as_str(), Some("/tmp/a \"b\"/bench-s2.pin"));
        assert_eq!(p["sessions"].as_integer(), Some(2));
        // The key manager accepts it.
        let cfg: Pkcs11Config = p.clone().try_into().unwrap();
        assert_eq!(cfg.validate(), Ok(()));
    }

    #[test]
    fn raw_child_measures_a_softhsm_token() {
        let Some(token) = hsm_sim::softhsm::softhsm_test(
            "pkcs11::tests::raw_child_measures_a_softhsm_token",
            "raw",
        ) else {
            return;
        };
        let out = raw_child(&RawArgs {
            module: token.module.clone(),
            token_label: token.label.clone(),
            pin_file: token.pin_file.clone(),
            threads: vec![1, 2],
            runs: 2,
            seconds: 0.05,
        })
        .unwrap();
        assert_eq!(
            out.rates.iter().map(|r| r.threads).collect::<Vec<_>>(),
            vec![1, 2]
        );
        for r in &out.rates {
            assert_eq!(r.runs.len(), 2);
            assert!(
                r.runs
                    .iter()
                    .all(|x| x.rate > 0.0 && x.cpu_us_per_sig >= 0.0)
            );
        }
        // A second child on the same token reuses the key.
        let again = raw_child(&RawArgs {
            module: token.module.clone(),
            token_label: token.label.clone(),
            pin_file: token.pin_file.clone(),
            threads: vec![1],
            runs: 1,
            seconds: 0.05,
        })
        .unwrap();
        assert_eq!(again.rates.len(), 1);
    }

    #[test]
    fn crypto_backend_from_ldd() {
        let ldd = "\tlinux-vdso.so.1 (0x00007f)\n\tlibcrypto.so.3 => /lib/x86_64-linux-gnu/libcrypto.so.3 (0x00007f)\n\tlibc.so.6 => /lib/libc.so.6\n";
        assert_eq!(
            crypto_backend(ldd).as_deref(),
            Some("OpenSSL libcrypto.so.3")
        );
        assert_eq!(crypto_backend("libc.so.6 => /lib/libc.so.6"), None);
    }
    #[test]
    fn session_counts_are_one_and_every_core() {
        assert_eq!(session_counts(1), vec![1]);
        assert_eq!(session_counts(2), vec![1, 2]);
        assert_eq!(
            session_counts(1_000),
            vec![1, carapace_keymanager_pkcs11::MAX_SESSIONS]
        );
    }
}
