//! A throw-away SoftHSM2 for the PKCS#11 tests: a config file and a token directory in
//! a temporary directory, `SOFTHSM2_CONF` pointing at it, and every token a test binary
//! needs initialised up front. (SoftHSM2 reads its configuration and lists its tokens
//! once, at C_Initialize, so tokens must exist before the first provider is opened; each
//! test uses its own token, so tests can run in parallel.)
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const PIN: &str = "246810";
pub const SO_PIN: &str = "13579111";
/// Holds [`PIN`] for the whole test process.
pub const PIN_ENV: &str = "SHARDLOCK_TEST_HSM_PIN";
/// Holds a wrong PIN.
pub const BAD_PIN_ENV: &str = "SHARDLOCK_TEST_HSM_BAD_PIN";

pub struct Hsm {
    pub root: tempfile::TempDir,
    pub conf: PathBuf,
    /// Token label -> its directory under the tokendir.
    pub token_dirs: HashMap<String, PathBuf>,
}

fn softhsm_util(conf: &Path, args: &[&str]) {
    let out = Command::new("softhsm2-util").env("SOFTHSM2_CONF", conf).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run softhsm2-util ({e}): SoftHSM2 is not installed; run `apt-get install softhsm2` (make test installs it)")
    });
    assert!(
        out.status.success(),
        "softhsm2-util {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates the SoftHSM2 configuration and one token per label, and sets `SOFTHSM2_CONF`
/// and the PIN variables for this process.
pub fn setup(tokens: &[&str]) -> Hsm {
    assert!(
        Path::new(MODULE).is_file(),
        "SoftHSM2 is not installed ({MODULE} is missing): run `apt-get install softhsm2` (make test installs it)"
    );
    let root = tempfile::tempdir().unwrap();
    let tokendir = root.path().join("tokens");
    std::fs::create_dir(&tokendir).unwrap();
    let conf = root.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", tokendir.display()),
    )
    .unwrap();
    let mut token_dirs = HashMap::new();
    for label in tokens {
        let before: Vec<PathBuf> = std::fs::read_dir(&tokendir).unwrap().map(|e| e.unwrap().path()).collect();
        softhsm_util(&conf, &["--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", SO_PIN]);
        let new = std::fs::read_dir(&tokendir).unwrap().map(|e| e.unwrap().path()).find(|p| !before.contains(p));
        token_dirs.insert(label.to_string(), new.unwrap());
    }
    std::env::set_var("SOFTHSM2_CONF", &conf);
    std::env::set_var(PIN_ENV, PIN);
    std::env::set_var(BAD_PIN_ENV, "000000");
    Hsm { root, conf, token_dirs }
}

/// The URI of KEK `object` on token `token`, PIN from [`PIN_ENV`].
pub fn uri(token: &str, object: &str) -> String {
    format!("pkcs11:token={token};object={object}?module-path={MODULE}&pin-source=env:{PIN_ENV}")
}
