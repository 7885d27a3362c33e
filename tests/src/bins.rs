//! Where the pinned real binaries (etcd, kube-apiserver, kubectl) live, and
//! the one place that reads the environment variables naming it.
//!
//! `scripts/setup.sh` builds them into
//! `${RACKSCALE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rackscale}/bin`;
//! `RACKSCALE_BIN_DIR` overrides that directory. A missing binary is an error
//! that says how to build it, never a silent skip.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Directory holding the binaries; overrides every default below.
pub const ENV_BIN_DIR: &str = "RACKSCALE_BIN_DIR";
/// Cache root used by `scripts/setup.sh`; binaries are in its `bin/`.
pub const ENV_CACHE: &str = "RACKSCALE_CACHE";
/// When `1`, every work directory (logs, data) is kept after the test.
pub const ENV_KEEP_LOGS: &str = "RACKSCALE_KEEP_LOGS";

/// The etcd server binary's file name.
pub const ETCD: &str = "etcd";
/// The kube-apiserver binary's file name.
pub const KUBE_APISERVER: &str = "kube-apiserver";
/// The kubectl binary's file name.
pub const KUBECTL: &str = "kubectl";

/// The directory the harness takes binaries from, resolved the same way as
/// `scripts/setup.sh` does.
pub fn bin_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var(ENV_BIN_DIR) {
        return PathBuf::from(dir);
    }
    if let Some(cache) = var(ENV_CACHE) {
        return PathBuf::from(cache).join("bin");
    }
    let cache_home = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache_home.join("rackscale").join("bin")
}

/// Path of binary `name` in [`bin_dir`], or an error saying to run setup.
pub fn binary(name: &str) -> Result<PathBuf> {
    binary_in(&bin_dir(), name)
}

/// Path of binary `name` in `dir`, or an error saying to run setup.
pub fn binary_in(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if path.is_file() {
        return Ok(path);
    }
    bail!(
        "{name} not found at {}: run `make setup` (or `scripts/setup.sh`) to build the pinned \
         test binaries, or point {ENV_BIN_DIR} at a directory that holds them",
        path.display()
    )
}

/// Whether `RACKSCALE_KEEP_LOGS=1` asks to keep every work directory.
pub fn keep_logs_requested() -> bool {
    std::env::var(ENV_KEEP_LOGS).is_ok_and(|v| v == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_says_how_to_get_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = binary_in(dir.path(), KUBE_APISERVER)
            .unwrap_err()
            .to_string();
        assert!(err.contains("kube-apiserver not found"), "{err}");
        assert!(err.contains("make setup"), "{err}");
        assert!(err.contains("scripts/setup.sh"), "{err}");
    }

    #[test]
    fn present_binary_is_found() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ETCD), b"").unwrap();
        assert_eq!(binary_in(dir.path(), ETCD).unwrap(), dir.path().join(ETCD));
    }
}
