//! [`TlsArgs`]: the `--tls-*` and `--insecure-plaintext` flags every
//! binary flattens into its own clap `Args`, and their validation into a
//! [`Transport`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{TlsFiles, TlsSettings, Transport, env};
use crate::error::{Error, Result};

/// How this process's gRPC links are secured.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct TlsArgs {
    /// PEM file of the CA that signs every rackscale certificate: servers
    /// accept only clients whose certificate it signed, clients only
    /// servers whose certificate it signed.
    #[arg(long = "tls-ca", env = env::CA, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// PEM file of this process's certificate (leaf first), presented as
    /// server and as client.
    #[arg(long = "tls-cert", env = env::CERT, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// PEM file of this process's private key.
    #[arg(long = "tls-key", env = env::KEY, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Name server certificates must carry (a DNS or IP SAN); default: the
    /// host each client dials. Set it where servers are dialled by pod IP.
    #[arg(long = "tls-server-name", env = env::SERVER_NAME, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Seconds between checks of the TLS files for a change (a changed file
    /// is re-read on the next handshake; 0: check on every handshake).
    #[arg(long = "tls-reload-seconds", env = env::RELOAD_SECONDS, default_value_t = 5)]
    pub tls_reload_seconds: u64,
    /// Serve and dial gRPC without TLS, for local runs on a trusted host.
    #[arg(
        long = "insecure-plaintext",
        env = env::INSECURE_PLAINTEXT,
        value_parser = clap::builder::BoolishValueParser::new(),
        num_args = 0..=1,
        require_equals = true,
        default_value = "false",
        default_missing_value = "true"
    )]
    pub insecure_plaintext: bool,
}

impl TlsArgs {
    /// Mutual TLS with these files (tests, and `rackscale up`'s own CA).
    pub fn mtls(files: &TlsFiles) -> Self {
        Self {
            tls_ca: Some(files.ca.clone()),
            tls_cert: Some(files.cert.clone()),
            tls_key: Some(files.key.clone()),
            ..Self::default()
        }
    }

    /// The transport the flags choose. Without TLS files and without
    /// `--insecure-plaintext` this refuses, naming the flags to give.
    pub fn transport(&self) -> Result<Transport> {
        let files = [&self.tls_ca, &self.tls_cert, &self.tls_key];
        let given = files.iter().filter(|f| f.is_some()).count();
        if self.insecure_plaintext {
            if given > 0 {
                return Err(Error::tls(
                    "--insecure-plaintext and --tls-ca/--tls-cert/--tls-key exclude each other; \
                     give one or the other",
                ));
            }
            return Ok(Transport::Plaintext);
        }
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Transport::Mtls(TlsSettings {
                files: TlsFiles {
                    ca: absolute(ca)?,
                    cert: absolute(cert)?,
                    key: absolute(key)?,
                },
                server_name: self.tls_server_name.clone().filter(|n| !n.is_empty()),
                reload: Duration::from_secs(self.tls_reload_seconds),
            })),
            _ if given == 0 => Err(Error::tls(format!(
                "gRPC links need mutual TLS: give --tls-ca, --tls-cert and --tls-key \
                 ({}, {}, {}), or --insecure-plaintext ({}=true) for a local run without TLS",
                env::CA,
                env::CERT,
                env::KEY,
                env::INSECURE_PLAINTEXT
            ))),
            _ => {
                let missing: Vec<&str> = [
                    ("--tls-ca", &self.tls_ca),
                    ("--tls-cert", &self.tls_cert),
                    ("--tls-key", &self.tls_key),
                ]
                .into_iter()
                .filter(|(_, f)| f.is_none())
                .map(|(name, _)| name)
                .collect();
                Err(Error::tls(format!(
                    "mutual TLS needs all of --tls-ca, --tls-cert and --tls-key; missing {}",
                    missing.join(", ")
                )))
            }
        }
    }
}

/// `path` made absolute, so child processes started elsewhere find it.
fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| Error::tls(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        tls: TlsArgs,
    }

    fn parse(args: &[&str]) -> TlsArgs {
        Cli::try_parse_from(std::iter::once("bin").chain(args.iter().copied()))
            .unwrap()
            .tls
    }

    #[test]
    fn without_files_or_the_flag_the_binary_refuses() {
        let err = parse(&[]).transport().unwrap_err().to_string();
        assert!(err.contains("--tls-ca, --tls-cert and --tls-key"), "{err}");
        assert!(err.contains("--insecure-plaintext"), "{err}");
        assert!(err.contains(env::INSECURE_PLAINTEXT), "{err}");
    }

    #[test]
    fn plaintext_only_when_asked() {
        assert_eq!(
            parse(&["--insecure-plaintext"]).transport().unwrap(),
            Transport::Plaintext
        );
        assert_eq!(
            parse(&["--insecure-plaintext=true"]).transport().unwrap(),
            Transport::Plaintext
        );
        assert!(parse(&["--insecure-plaintext=false"]).transport().is_err());
        let both = parse(&["--insecure-plaintext", "--tls-ca=/ca.pem"]).transport();
        assert!(both.unwrap_err().to_string().contains("exclude"));
    }

    #[test]
    fn all_three_files_or_an_error_naming_the_missing() {
        let t = parse(&["--tls-ca=ca.pem", "--tls-cert=/c.pem", "--tls-key=/k.pem"])
            .transport()
            .unwrap();
        let Transport::Mtls(s) = t else {
            panic!("not mTLS")
        };
        assert!(s.files.ca.is_absolute());
        assert_eq!(s.reload, Duration::from_secs(5));
        let err = parse(&["--tls-ca=/ca.pem"]).transport().unwrap_err();
        assert!(
            err.to_string().contains("missing --tls-cert, --tls-key"),
            "{err}"
        );
    }
}
