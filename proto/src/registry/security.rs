//! How the registry client authenticates to etcd: client TLS (the server's
//! CA, optionally a client certificate for `--client-cert-auth`) and etcd
//! user authentication (a user name and a password read from a file).
//!
//! The flags ([`EtcdArgs`]) are the same on every binary that talks to
//! etcd; [`EtcdSecurity::env`] hands them to child processes (an agent's
//! engine ranks). Files are read when the client connects: a rotated etcd
//! client certificate applies on the next connect (process restart).

use std::path::PathBuf;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use crate::error::{Error, Result};

/// Environment twins of the `--etcd-*` security flags.
pub mod env {
    /// PEM file of the CA that signed etcd's serving certificate.
    pub const CA: &str = "RACKSCALE_ETCD_CA";
    /// PEM client certificate for etcd's `--client-cert-auth`.
    pub const CERT: &str = "RACKSCALE_ETCD_CERT";
    /// Its private key.
    pub const KEY: &str = "RACKSCALE_ETCD_KEY";
    /// etcd user (etcd's `auth enable`).
    pub const USERNAME: &str = "RACKSCALE_ETCD_USERNAME";
    /// File holding that user's password.
    pub const PASSWORD_FILE: &str = "RACKSCALE_ETCD_PASSWORD_FILE";
}

/// The `--etcd-ca`, `--etcd-cert`, `--etcd-key`, `--etcd-username` and
/// `--etcd-password-file` flags.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct EtcdArgs {
    /// PEM CA that signed etcd's serving certificate; turns on TLS to etcd
    /// (endpoints must then be `https://`).
    #[arg(long = "etcd-ca", env = env::CA, value_name = "PEM")]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate presented to etcd (with --etcd-key).
    #[arg(long = "etcd-cert", env = env::CERT, value_name = "PEM")]
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long = "etcd-key", env = env::KEY, value_name = "PEM")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user to authenticate as (with --etcd-password-file).
    #[arg(long = "etcd-username", env = env::USERNAME)]
    pub etcd_username: Option<String>,
    /// File whose content (trailing newline stripped) is the user's password.
    #[arg(long = "etcd-password-file", env = env::PASSWORD_FILE, value_name = "FILE")]
    pub etcd_password_file: Option<PathBuf>,
}

/// TLS to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA of etcd's serving certificate.
    pub ca: PathBuf,
    /// Client certificate and key, when etcd requires one.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name etcd's certificate must carry; default: the endpoint's host.
    pub server_name: Option<String>,
}

/// etcd user authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUser {
    /// User name.
    pub name: String,
    /// File holding the password.
    pub password_file: PathBuf,
}

/// Everything the registry client needs to authenticate to etcd; the
/// default is neither TLS nor a user (a local etcd on loopback).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdSecurity {
    /// TLS, if etcd serves it.
    pub tls: Option<EtcdTls>,
    /// A user, if etcd has authentication enabled.
    pub user: Option<EtcdUser>,
}

fn absolute(path: &std::path::Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| Error::tls(format!("{}: {e}", path.display())))
}

impl EtcdArgs {
    /// The validated settings: the certificate and key come together and
    /// need the CA, the user and the password file come together.
    pub fn security(&self) -> Result<EtcdSecurity> {
        let identity = match (&self.etcd_cert, &self.etcd_key) {
            (Some(c), Some(k)) => Some((absolute(c)?, absolute(k)?)),
            (None, None) => None,
            _ => return Err(Error::tls("--etcd-cert and --etcd-key go together")),
        };
        let tls = match (&self.etcd_ca, identity) {
            (Some(ca), identity) => Some(EtcdTls {
                ca: absolute(ca)?,
                identity,
                server_name: None,
            }),
            (None, Some(_)) => {
                return Err(Error::tls(
                    "--etcd-cert needs --etcd-ca (the CA of etcd's serving certificate)",
                ));
            }
            (None, None) => None,
        };
        let user = match (&self.etcd_username, &self.etcd_password_file) {
            (Some(name), Some(file)) => Some(EtcdUser {
                name: name.clone(),
                password_file: absolute(file)?,
            }),
            (None, None) => None,
            _ => {
                return Err(Error::tls(
                    "--etcd-username and --etcd-password-file go together",
                ));
            }
        };
        Ok(EtcdSecurity { tls, user })
    }
}

impl EtcdSecurity {
    /// The environment a child process needs for the same settings.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut put =
            |k: &str, v: &std::path::Path| out.push((k.to_owned(), v.display().to_string()));
        if let Some(tls) = &self.tls {
            put(env::CA, &tls.ca);
            if let Some((cert, key)) = &tls.identity {
                put(env::CERT, cert);
                put(env::KEY, key);
            }
        }
        if let Some(user) = &self.user {
            put(env::PASSWORD_FILE, &user.password_file);
            out.push((env::USERNAME.to_owned(), user.name.clone()));
        }
        out
    }

    /// Checks `endpoints` against the settings: with TLS each must be
    /// `https://` or bare `host:port`, without it none may be `https://`.
    pub fn check_endpoints(&self, endpoints: &[String]) -> Result<()> {
        for e in endpoints {
            if self.tls.is_some() && e.starts_with("http://") {
                return Err(Error::tls(format!(
                    "etcd endpoint {e} is plain HTTP but --etcd-ca turns on TLS: write https://"
                )));
            }
            if self.tls.is_none() && e.starts_with("https://") {
                return Err(Error::tls(format!(
                    "etcd endpoint {e} is HTTPS: give --etcd-ca (and --etcd-cert/--etcd-key if etcd checks client certificates)"
                )));
            }
        }
        Ok(())
    }

    /// `options` with these settings applied (files read now).
    pub fn apply(&self, mut options: ConnectOptions) -> Result<ConnectOptions> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| Error::tls(format!("reading {}: {e}", p.display())))
        };
        if let Some(tls) = &self.tls {
            let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            if let Some(name) = &tls.server_name {
                t = t.domain_name(name.clone());
            }
            options = options.with_tls(t);
        }
        if let Some(user) = &self.user {
            let password = String::from_utf8(read(&user.password_file)?).map_err(|_| {
                Error::tls(format!(
                    "{} is not UTF-8 text",
                    user.password_file.display()
                ))
            })?;
            let password = password.trim_end_matches(['\n', '\r']).to_owned();
            options = options
                .with_user(user.name.clone(), password)
                .with_auto_token_refresh(true);
        }
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_come_in_pairs() {
        let only_cert = EtcdArgs {
            etcd_cert: Some("/c".into()),
            ..EtcdArgs::default()
        };
        assert!(only_cert.security().is_err());
        let no_ca = EtcdArgs {
            etcd_cert: Some("/c".into()),
            etcd_key: Some("/k".into()),
            ..EtcdArgs::default()
        };
        assert!(
            no_ca
                .security()
                .unwrap_err()
                .to_string()
                .contains("--etcd-ca")
        );
        let no_password = EtcdArgs {
            etcd_username: Some("root".into()),
            ..EtcdArgs::default()
        };
        assert!(no_password.security().is_err());
        assert_eq!(
            EtcdArgs::default().security().unwrap(),
            EtcdSecurity::default()
        );
    }

    #[test]
    fn endpoints_match_the_scheme_and_children_inherit() {
        let s = EtcdArgs {
            etcd_ca: Some("/ca".into()),
            etcd_username: Some("root".into()),
            etcd_password_file: Some("/pw".into()),
            ..EtcdArgs::default()
        }
        .security()
        .unwrap();
        assert!(s.check_endpoints(&["https://127.0.0.1:1".into()]).is_ok());
        assert!(s.check_endpoints(&["http://127.0.0.1:1".into()]).is_err());
        assert!(
            EtcdSecurity::default()
                .check_endpoints(&["https://a:1".into()])
                .is_err()
        );
        let env = s.env();
        assert!(env.contains(&(env::CA.to_owned(), "/ca".to_owned())));
        assert!(env.contains(&(env::USERNAME.to_owned(), "root".to_owned())));
    }
}
