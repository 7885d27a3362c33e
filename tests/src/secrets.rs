//! Credentials a throwaway kube-apiserver needs: a random bearer token for
//! an admin in `system:masters`, and the service-account signing key pair
//! (ECDSA P-256, generated in process with `rcgen`).

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// User name the admin token authenticates as.
pub const ADMIN_USER: &str = "admin";
/// Group that RBAC grants every permission to.
pub const ADMIN_GROUP: &str = "system:masters";

/// `bytes` random bytes from the kernel, hex encoded.
pub fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(buf
        .iter()
        .fold(String::with_capacity(bytes * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        }))
}

/// One line of a kube-apiserver `--token-auth-file`:
/// `token,user,uid,"group1,group2"`.
pub fn token_file_line(token: &str, user: &str, groups: &[&str]) -> String {
    format!("{token},{user},{user},\"{}\"\n", groups.join(","))
}

/// Writes a token file with one admin token in `system:masters` to `path`.
pub fn write_admin_token_file(path: &Path, token: &str) -> Result<()> {
    std::fs::write(path, token_file_line(token, ADMIN_USER, &[ADMIN_GROUP]))
        .with_context(|| format!("writing token file {}", path.display()))
}

/// Paths of a service-account key pair written as PEM files.
#[derive(Debug, Clone)]
pub struct ServiceAccountKeys {
    /// PKCS#8 private key, for `--service-account-signing-key-file`.
    pub private_key: PathBuf,
    /// SubjectPublicKeyInfo public key, for `--service-account-key-file`.
    pub public_key: PathBuf,
}

/// Generates an ECDSA P-256 key pair into `dir/sa.key` and `dir/sa.pub`.
pub fn write_service_account_keys(dir: &Path) -> Result<ServiceAccountKeys> {
    let pair = rcgen::KeyPair::generate().context("generating the service-account key pair")?;
    let keys = ServiceAccountKeys {
        private_key: dir.join("sa.key"),
        public_key: dir.join("sa.pub"),
    };
    std::fs::write(&keys.private_key, pair.serialize_pem())
        .with_context(|| format!("writing {}", keys.private_key.display()))?;
    std::fs::write(&keys.public_key, pair.public_key_pem())
        .with_context(|| format!("writing {}", keys.public_key.display()))?;
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_hex_is_random_and_sized() {
        let a = random_hex(16).unwrap();
        let b = random_hex(16).unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn token_line_quotes_groups() {
        assert_eq!(
            token_file_line("t0k", "admin", &["system:masters", "dev"]),
            "t0k,admin,admin,\"system:masters,dev\"\n"
        );
    }

    #[test]
    fn service_account_keys_are_pem() {
        let dir = tempfile::tempdir().unwrap();
        let keys = write_service_account_keys(dir.path()).unwrap();
        let private = std::fs::read_to_string(keys.private_key).unwrap();
        let public = std::fs::read_to_string(keys.public_key).unwrap();
        assert!(
            private.starts_with("-----BEGIN PRIVATE KEY-----"),
            "{private}"
        );
        assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"), "{public}");
    }
}
