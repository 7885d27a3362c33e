//! A throwaway certificate authority for mutual TLS between the processes a
//! test (or `rackscale up`) starts: one CA per run, one certificate per
//! process, generated in process with `rcgen` (ECDSA P-256).
//!
//! Every leaf certificate names `localhost`, `127.0.0.1` and `::1` besides
//! its own name, and carries both TLS purposes (server and client), because
//! each rackscale process is both. Files are written atomically (a
//! temporary file renamed into place), so a server re-reading them never
//! sees half a certificate.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use proto::tls::{TlsFiles, Transport};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// A CA whose certificate lives in `<dir>/ca.pem`.
pub struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}

impl Pki {
    /// A new CA named `name`, written into `dir` (created if missing).
    pub fn create(dir: &Path, name: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().context("generating the CA key")?;
        let issuer = CertifiedIssuer::self_signed(params, key).context("self-signing the CA")?;
        let ca = dir.join("ca.pem");
        write_atomically(&ca, &issuer.pem())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            ca,
            issuer,
        })
    }

    /// The CA certificate's file.
    pub fn ca_path(&self) -> &Path {
        &self.ca
    }

    /// Issues (or re-issues: new key, new certificate, same files) the
    /// certificate of `name` for `localhost`, `127.0.0.1`, `::1` and `name`.
    pub fn issue(&self, name: &str) -> Result<TlsFiles> {
        self.issue_for(name, &[name, "localhost", "127.0.0.1", "::1"])
    }

    /// Issues the certificate of `name` with exactly `sans` (DNS names or
    /// IP addresses) into `<dir>/<name>.pem` and `<dir>/<name>-key.pem`.
    pub fn issue_for(&self, name: &str, sans: &[&str]) -> Result<TlsFiles> {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).context("certificate names")?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().context("generating a key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("signing the certificate of {name}"))?;
        let files = TlsFiles {
            ca: self.ca.clone(),
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        };
        write_atomically(&files.key, &key.serialize_pem())?;
        write_atomically(&files.cert, &cert.pem())?;
        Ok(files)
    }

    /// The mutual-TLS transport of a process holding `name`'s certificate.
    pub fn transport(&self, name: &str) -> Result<Transport> {
        Ok(Transport::mtls(self.issue(name)?))
    }

    /// The command-line flags giving a process `name`'s certificate.
    pub fn args(&self, name: &str) -> Result<Vec<String>> {
        Ok(flags(&self.issue(name)?))
    }
}

/// `--tls-ca=…`, `--tls-cert=…`, `--tls-key=…` for `files`.
pub fn flags(files: &TlsFiles) -> Vec<String> {
    vec![
        format!("--tls-ca={}", files.ca.display()),
        format!("--tls-cert={}", files.cert.display()),
        format!("--tls-key={}", files.key.display()),
    ]
}

/// The flags of a process whose gRPC runs without TLS.
pub fn plaintext_flags() -> Vec<String> {
    vec!["--insecure-plaintext".to_owned()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_loadable_certificates_under_one_ca() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(dir.path(), "test CA").unwrap();
        let files = pki.issue("agent-0").unwrap();
        assert_eq!(files.ca, pki.ca_path());
        let transport = Transport::mtls(files.clone());
        transport.client().unwrap();
        transport.server(proto::tls::Alpn::H2).unwrap().unwrap();
        let text = std::fs::read_to_string(&files.cert).unwrap();
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{text}");
        let again = pki.issue("agent-0").unwrap();
        assert_ne!(std::fs::read_to_string(&again.cert).unwrap(), text);
        assert_eq!(flags(&files).len(), 3);
    }
}
