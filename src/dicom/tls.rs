//! DICOM TLS: one config shape ([`TlsConfig`]) for the SCP's TLS port and every SCU
//! (C-ECHO, C-STORE to PACS), and the rustls configurations built from it
//! ([`server_config`], [`client_config`]), with errors that name the file and the problem.
//!
//! The TLS stack is rustls with the aws-lc-rs crypto provider, the one rumqttc already
//! brings (no second TLS library or provider). Protocol versions are rustls' safe defaults,
//! TLS 1.3 and TLS 1.2, and its default cipher suites (AEAD only: AES-GCM and
//! ChaCha20-Poly1305 with ECDHE key exchange): the DICOM BCP 195 TLS profiles
//! (docs/CONFORMANCE.md). Certificates are read from PEM files: the certificate file holds
//! the chain (leaf first), the key file one PKCS#8, PKCS#1 or SEC1 private key, the CA
//! file one or more trusted certificates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};

/// TLS files and choices of one side of a DICOM connection. The SCP's `[dicom.tls]`
/// section carries the same keys (see [`super::ScpTlsConfig`]); an SCU takes one of these.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with our certificate chain, leaf first. Required for a server; for a
    /// client only when the server asks for a client certificate.
    pub certificate: Option<PathBuf>,
    /// PEM file with the private key of `certificate`.
    pub private_key: Option<PathBuf>,
    /// PEM bundle of the certificates trusted to sign the peer's certificate. Required
    /// for a client (the server's certificate is always verified) and for a server with
    /// `verify_client`.
    pub ca: Option<PathBuf>,
    /// Server side: require a client certificate signed by `ca` (mutual TLS). A client
    /// without one, or with one from another CA, fails the handshake.
    pub verify_client: bool,
    /// Client side: the name the server's certificate must carry, when it differs from
    /// the host part of the address connected to (for example when connecting by IP to a
    /// certificate issued for a DNS name).
    pub server_name: Option<String>,
}

/// Which end of the connection a [`TlsConfig`] is for (what is required differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// Which key of [`TlsConfig`] a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsKey {
    Certificate,
    PrivateKey,
    Ca,
}

impl std::fmt::Display for TlsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsKey::Certificate => "certificate",
            TlsKey::PrivateKey => "private_key",
            TlsKey::Ca => "ca",
        })
    }
}

/// Why a TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.{key} is not set, and is required {why}")]
    NotSet { key: TlsKey, why: &'static str },
    #[error("tls.{key}: {} does not exist", path.display())]
    Missing { key: TlsKey, path: PathBuf },
    #[error("tls.{key}: cannot read {}: {source}", path.display())]
    Unreadable {
        key: TlsKey,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tls.{key}: {} is not valid PEM: {detail}", path.display())]
    BadPem {
        key: TlsKey,
        path: PathBuf,
        detail: String,
    },
    #[error("tls.{key}: {} holds no PEM certificate", path.display())]
    NoCertificate { key: TlsKey, path: PathBuf },
    #[error("tls.private_key: {} holds no PEM private key", path.display())]
    NoPrivateKey { path: PathBuf },
    #[error("tls.ca: a certificate in {} cannot be used as a trust anchor: {detail}", path.display())]
    BadCa { path: PathBuf, detail: String },
    #[error(
        "tls.private_key: {} does not match the certificate in {}",
        key.display(),
        certificate.display()
    )]
    KeyMismatch { key: PathBuf, certificate: PathBuf },
    #[error("tls.private_key: {} cannot be used with {}: {detail}", key.display(), certificate.display())]
    BadKey {
        key: PathBuf,
        certificate: PathBuf,
        detail: String,
    },
    #[error("tls.server_name: {name:?} is neither a DNS name nor an IP address")]
    BadServerName { name: String },
    #[error("TLS configuration refused by rustls: {0}")]
    Rustls(rustls::Error),
}

/// The crypto provider and protocol versions of every DICOM TLS connection.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read(key: TlsKey, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => TlsError::Missing {
            key,
            path: path.to_path_buf(),
        },
        _ => TlsError::Unreadable {
            key,
            path: path.to_path_buf(),
            source,
        },
    })
}

fn bad_pem(key: TlsKey, path: &Path, e: pem::Error) -> TlsError {
    match e {
        pem::Error::Io(source) => TlsError::Unreadable {
            key,
            path: path.to_path_buf(),
            source,
        },
        other => TlsError::BadPem {
            key,
            path: path.to_path_buf(),
            detail: format!("{other:?}"),
        },
    }
}

/// Every certificate in a PEM file (at least one).
pub fn load_certificates(
    key: TlsKey,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_pem(key, path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            key,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(TlsKey::PrivateKey, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_path_buf(),
        },
        other => bad_pem(TlsKey::PrivateKey, path, other),
    })
}

/// The trust anchors of a CA bundle.
fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certificates(TlsKey::Ca, path)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn required<'a>(
    value: &'a Option<PathBuf>,
    key: TlsKey,
    why: &'static str,
) -> Result<&'a Path, TlsError> {
    value.as_deref().ok_or(TlsError::NotSet { key, why })
}

/// Our certificate chain and key, checked to belong together.
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Identity {
    fn load(certificate: &Path, private_key: &Path) -> Result<Identity, TlsError> {
        let chain = load_certificates(TlsKey::Certificate, certificate)?;
        let key = load_private_key(private_key)?;
        // The same check rustls makes when the config is built, here with file names.
        let signing = provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| TlsError::BadKey {
                key: private_key.to_path_buf(),
                certificate: certificate.to_path_buf(),
                detail: e.to_string(),
            })?;
        match rustls::sign::CertifiedKey::new(chain.clone(), signing).keys_match() {
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                Err(TlsError::KeyMismatch {
                    key: private_key.to_path_buf(),
                    certificate: certificate.to_path_buf(),
                })
            }
            _ => Ok(Identity { chain, key }),
        }
    }
}

impl TlsConfig {
    /// Loads every file this config names and reports each problem (not only the
    /// first): what `check-config` prints.
    pub fn problems(&self, role: Role) -> Vec<TlsError> {
        let mut out = Vec::new();
        let (cert, key) = (&self.certificate, &self.private_key);
        match role {
            Role::Server => {
                if cert.is_none() {
                    out.push(TlsError::NotSet {
                        key: TlsKey::Certificate,
                        why: "for a TLS server",
                    });
                }
                if key.is_none() {
                    out.push(TlsError::NotSet {
                        key: TlsKey::PrivateKey,
                        why: "for a TLS server",
                    });
                }
                if self.verify_client && self.ca.is_none() {
                    out.push(TlsError::NotSet {
                        key: TlsKey::Ca,
                        why: "with verify_client",
                    });
                }
            }
            Role::Client => {
                if self.ca.is_none() {
                    out.push(TlsError::NotSet {
                        key: TlsKey::Ca,
                        why: "for a TLS client (the server's certificate is verified)",
                    });
                }
                if cert.is_some() != key.is_some() {
                    out.push(TlsError::NotSet {
                        key: if cert.is_none() {
                            TlsKey::Certificate
                        } else {
                            TlsKey::PrivateKey
                        },
                        why: "when the other half of the client identity is set",
                    });
                }
                if let Some(name) = &self.server_name {
                    if ServerName::try_from(name.clone()).is_err() {
                        out.push(TlsError::BadServerName { name: name.clone() });
                    }
                }
            }
        }
        let cert_ok = match cert {
            Some(p) => load_certificates(TlsKey::Certificate, p)
                .map_err(|e| out.push(e))
                .is_ok(),
            None => false,
        };
        let key_ok = match key {
            Some(p) => load_private_key(p).map_err(|e| out.push(e)).is_ok(),
            None => false,
        };
        if let (true, true, Some(c), Some(k)) = (cert_ok, key_ok, cert, key) {
            if let Err(e) = Identity::load(c, k) {
                out.push(e);
            }
        }
        if let Some(ca) = &self.ca {
            if let Err(e) = load_roots(ca) {
                out.push(e);
            }
        }
        out
    }
}

/// The rustls server configuration of the SCP's TLS port: our certificate and key, and
/// with `verify_client` a required client certificate signed by `ca`.
pub fn server_config(config: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let why = "for a TLS server";
    let identity = Identity::load(
        required(&config.certificate, TlsKey::Certificate, why)?,
        required(&config.private_key, TlsKey::PrivateKey, why)?,
    )?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?;
    let builder = if config.verify_client {
        let ca = required(&config.ca, TlsKey::Ca, "with verify_client")?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider())
                .build()
                .map_err(|e| TlsError::BadCa {
                    path: ca.to_path_buf(),
                    detail: e.to_string(),
                })?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let server = builder
        .with_single_cert(identity.chain, identity.key)
        .map_err(TlsError::Rustls)?;
    Ok(Arc::new(server))
}

/// The rustls client configuration of an SCU: the server's certificate must be signed by
/// `ca`; `certificate` and `private_key`, when set, are offered as the client identity.
pub fn client_config(config: &TlsConfig) -> Result<Arc<ClientConfig>, TlsError> {
    let ca = required(
        &config.ca,
        TlsKey::Ca,
        "for a TLS client (the server's certificate is verified)",
    )?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_root_certificates(load_roots(ca)?);
    let client = match (&config.certificate, &config.private_key) {
        (None, None) => builder.with_no_client_auth(),
        (cert, key) => {
            let why = "when the other half of the client identity is set";
            let identity = Identity::load(
                required(cert, TlsKey::Certificate, why)?,
                required(key, TlsKey::PrivateKey, why)?,
            )?;
            builder
                .with_client_auth_cert(identity.chain, identity.key)
                .map_err(TlsError::Rustls)?
        }
    };
    Ok(Arc::new(client))
}

/// The name to verify the server's certificate against: `server_name` if set, else the
/// host part of `address` (`host:port`, `[v6]:port`).
pub fn server_name(config: &TlsConfig, address: &str) -> Result<String, TlsError> {
    let name = match &config.server_name {
        Some(name) => name.clone(),
        None => {
            let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        }
    };
    ServerName::try_from(name.clone())
        .map_err(|_| TlsError::BadServerName { name: name.clone() })?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_defaults_to_the_host() {
        let c = TlsConfig::default();
        assert_eq!(server_name(&c, "127.0.0.1:2762").unwrap(), "127.0.0.1");
        assert_eq!(server_name(&c, "pacs.example:104").unwrap(), "pacs.example");
        assert_eq!(server_name(&c, "[::1]:104").unwrap(), "::1");
        let c = TlsConfig {
            server_name: Some("pacs.local".into()),
            ..TlsConfig::default()
        };
        assert_eq!(server_name(&c, "10.0.0.1:104").unwrap(), "pacs.local");
    }

    #[test]
    fn missing_files_and_keys_are_named() {
        let c = TlsConfig {
            certificate: Some("/nonexistent/cert.pem".into()),
            ..TlsConfig::default()
        };
        let problems = c.problems(Role::Server);
        assert!(problems.iter().any(|p| matches!(
            p,
            TlsError::NotSet {
                key: TlsKey::PrivateKey,
                ..
            }
        )));
        assert!(problems.iter().any(|p| matches!(
            p,
            TlsError::Missing {
                key: TlsKey::Certificate,
                ..
            }
        )));
        assert!(matches!(
            client_config(&TlsConfig::default()),
            Err(TlsError::NotSet {
                key: TlsKey::Ca,
                ..
            })
        ));
    }

    #[test]
    fn a_file_without_pem_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, b"not pem at all\n").unwrap();
        assert!(matches!(
            load_certificates(TlsKey::Ca, &path),
            Err(TlsError::NoCertificate { .. })
        ));
        assert!(matches!(
            load_private_key(&path),
            Err(TlsError::NoPrivateKey { .. })
        ));
    }
}
