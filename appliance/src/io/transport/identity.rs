//! This appliance's TLS identity (a self-signed key pair kept in the state dir) and the
//! certificate fingerprint by which peers pin each other.
//!
//! Pinning replaces a CA: each appliance creates its own key pair on first start, prints its
//! fingerprint (`ferry identity`), and the operator writes the peer's fingerprint into the
//! other appliance's config. The key file is created 0600 and refused if anyone else can read it.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::PublicKeyData;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

/// File name of the private key (PKCS#8, PEM) inside the keys directory.
pub const KEY_FILE_NAME: &str = "identity.key";
/// File name of the self-signed certificate (PEM) inside the keys directory.
pub const CERT_FILE_NAME: &str = "identity.crt";

/// Subject name put into the self-signed certificate. Peers never check it: the fingerprint is
/// the identity. It only makes the certificate readable with `openssl x509 -text`.
pub(crate) const CERT_SUBJECT_NAME: &str = "ferry-appliance";

const FINGERPRINT_PREFIX: &str = "sha256:";

/// SHA-256 of a DER certificate, written `sha256:<64 lowercase hex>` in configs and logs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_certificate(cert_der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(cert_der).into())
    }

    /// The 32 raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{FINGERPRINT_PREFIX}{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, formatter)
    }
}

/// Why a fingerprint string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FingerprintParseError {
    #[error("fingerprint {input:?} does not start with \"sha256:\"")]
    MissingPrefix { input: String },
    #[error("fingerprint {input:?} has {digits} hex digits after \"sha256:\", expected 64")]
    WrongLength { input: String, digits: usize },
    #[error("fingerprint {input:?} has a character that is not a lowercase hex digit at position {position}")]
    NotLowercaseHex { input: String, position: usize },
}

impl FromStr for Fingerprint {
    type Err = FingerprintParseError;

    fn from_str(input: &str) -> Result<Fingerprint, FingerprintParseError> {
        let digits = input.strip_prefix(FINGERPRINT_PREFIX).ok_or_else(|| {
            FingerprintParseError::MissingPrefix {
                input: input.to_owned(),
            }
        })?;
        // Only lowercase is accepted so that a fingerprint has exactly one spelling: configs
        // compared with grep or diff never disagree about the same key.
        if let Some(index) = digits
            .bytes()
            .position(|byte| !matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(FingerprintParseError::NotLowercaseHex {
                input: input.to_owned(),
                position: FINGERPRINT_PREFIX.len() + index,
            });
        }
        if digits.len() != 64 {
            return Err(FingerprintParseError::WrongLength {
                input: input.to_owned(),
                digits: digits.len(),
            });
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(digits, &mut bytes).map_err(|_| {
            FingerprintParseError::WrongLength {
                input: input.to_owned(),
                digits: digits.len(),
            }
        })?;
        Ok(Fingerprint(bytes))
    }
}

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Failure to load or create the identity, naming the file involved.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity: {operation} {path}: {source}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("identity: key file {path} has mode {mode:04o}; it must be readable by its owner only (chmod 600)")]
    KeyFileTooOpen { path: PathBuf, mode: u32 },
    #[error("identity: key file {key_path} exists but certificate {cert_path} is missing; restore it from a backup, or remove the key to create a new identity (peers must then pin the new fingerprint)")]
    CertificateMissing {
        key_path: PathBuf,
        cert_path: PathBuf,
    },
    #[error("identity: {path} holds no {expected} in PEM form")]
    BadPem {
        path: PathBuf,
        expected: &'static str,
    },
    #[error("identity: certificate {cert_path} was not made for key {key_path}")]
    KeyMismatch {
        key_path: PathBuf,
        cert_path: PathBuf,
    },
    #[error("identity: generating a key pair: {0}")]
    Generate(#[from] rcgen::Error),
}

/// This appliance's certificate and private key, and the certificate's fingerprint.
pub struct Identity {
    pub cert_der: CertificateDer<'static>,
    pub key_der: PrivatePkcs8KeyDer<'static>,
    pub fingerprint: Fingerprint,
}

impl Clone for Identity {
    // rustls key types are deliberately not `Clone`; copying the key is explicit here.
    fn clone(&self) -> Identity {
        Identity {
            cert_der: self.cert_der.clone(),
            key_der: self.key_der.clone_key(),
            fingerprint: self.fingerprint,
        }
    }
}

impl fmt::Debug for Identity {
    // Never print the private key.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads the key pair from `keys_dir`, creating the directory (0700) and a new self-signed
    /// key pair (key file 0600) if there is none yet. The same files give the same fingerprint
    /// on every start.
    pub fn load_or_create(keys_dir: &Path) -> Result<Identity, IdentityError> {
        let key_path = keys_dir.join(KEY_FILE_NAME);
        let cert_path = keys_dir.join(CERT_FILE_NAME);
        match fs::metadata(&key_path) {
            Ok(_) => Identity::load(&key_path, &cert_path),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                Identity::create(keys_dir, &key_path, &cert_path)
            }
            Err(source) => Err(IdentityError::Io {
                operation: "stat",
                path: key_path,
                source,
            }),
        }
    }

    /// A fresh identity kept only in memory (benchmarks, tests); never written anywhere.
    pub fn ephemeral() -> Result<Identity, IdentityError> {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec![CERT_SUBJECT_NAME.to_owned()])?;
        let cert_der = cert.der().clone();
        Ok(Identity {
            fingerprint: Fingerprint::of_certificate(&cert_der),
            cert_der,
            key_der: PrivatePkcs8KeyDer::from(signing_key.serialize_der()),
        })
    }

    /// The private key in the form rustls takes.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone_key())
    }

    fn load(key_path: &Path, cert_path: &Path) -> Result<Identity, IdentityError> {
        let mode = fs::metadata(key_path)
            .map_err(|source| IdentityError::Io {
                operation: "stat",
                path: key_path.to_owned(),
                source,
            })?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::KeyFileTooOpen {
                path: key_path.to_owned(),
                mode,
            });
        }
        let key_pem = read_text(key_path)?;
        let cert_pem = match fs::read_to_string(cert_path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Err(IdentityError::CertificateMissing {
                    key_path: key_path.to_owned(),
                    cert_path: cert_path.to_owned(),
                })
            }
            Err(source) => {
                return Err(IdentityError::Io {
                    operation: "read",
                    path: cert_path.to_owned(),
                    source,
                })
            }
        };
        let key_der = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| {
            IdentityError::BadPem {
                path: key_path.to_owned(),
                expected: "PKCS#8 PRIVATE KEY",
            }
        })?;
        let key_pair = rcgen::KeyPair::try_from(&key_der).map_err(|_| IdentityError::BadPem {
            path: key_path.to_owned(),
            expected: "usable PKCS#8 PRIVATE KEY",
        })?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|_| {
            IdentityError::BadPem {
                path: cert_path.to_owned(),
                expected: "CERTIFICATE",
            }
        })?;
        // A certificate from another key would make every handshake fail with a confusing
        // signature error; say so at start instead.
        if !certificate_has_public_key(&cert_der, &key_pair.subject_public_key_info()) {
            return Err(IdentityError::KeyMismatch {
                key_path: key_path.to_owned(),
                cert_path: cert_path.to_owned(),
            });
        }
        let fingerprint = Fingerprint::of_certificate(&cert_der);
        Ok(Identity {
            cert_der,
            key_der,
            fingerprint,
        })
    }

    fn create(
        keys_dir: &Path,
        key_path: &Path,
        cert_path: &Path,
    ) -> Result<Identity, IdentityError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(keys_dir)
            .map_err(|source| IdentityError::Io {
                operation: "create directory",
                path: keys_dir.to_owned(),
                source,
            })?;
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec![CERT_SUBJECT_NAME.to_owned()])?;
        // The certificate is written first and the key last: the key's presence is what marks
        // the identity as created, so a crash in between just creates a new pair next time.
        write_atomically(cert_path, cert.pem().as_bytes(), 0o644)?;
        write_atomically(key_path, signing_key.serialize_pem().as_bytes(), 0o600)?;
        sync_directory(keys_dir)?;
        let cert_der = cert.der().clone();
        let fingerprint = Fingerprint::of_certificate(&cert_der);
        tracing::info!(%fingerprint, dir = %keys_dir.display(), "created a new appliance identity");
        Ok(Identity {
            cert_der,
            key_der: PrivatePkcs8KeyDer::from(signing_key.serialize_der()),
            fingerprint,
        })
    }
}

fn read_text(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(|source| IdentityError::Io {
        operation: "read",
        path: path.to_owned(),
        source,
    })
}

/// Writes `contents` to a temporary file created with `mode`, syncs it, then renames it over
/// `path`, so a reader never sees a half-written key.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    let temporary_path = path.with_extension("tmp");
    let io_error = |operation: &'static str, at: &Path| {
        let at = at.to_owned();
        move |source| IdentityError::Io {
            operation,
            path: at,
            source,
        }
    };
    // A leftover from a crash may have any mode: remove it rather than reuse it.
    match fs::remove_file(&temporary_path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(io_error("remove", &temporary_path)(source)),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary_path)
        .map_err(io_error("create", &temporary_path))?;
    file.write_all(contents)
        .map_err(io_error("write", &temporary_path))?;
    file.sync_all().map_err(io_error("sync", &temporary_path))?;
    drop(file);
    fs::rename(&temporary_path, path).map_err(io_error("rename into place", path))
}

fn sync_directory(dir: &Path) -> Result<(), IdentityError> {
    fs::File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(|source| IdentityError::Io {
            operation: "sync directory",
            path: dir.to_owned(),
            source,
        })
}

/// Whether the DER certificate embeds exactly this SubjectPublicKeyInfo. A byte search is
/// enough here: the SPKI is a complete DER element inside the certificate's TBS part.
fn certificate_has_public_key(cert_der: &[u8], public_key_der: &[u8]) -> bool {
    !public_key_der.is_empty()
        && cert_der
            .windows(public_key_der.len())
            .any(|window| window == public_key_der)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_round_trips_and_rejects_bad_text() {
        let fingerprint = Fingerprint::of_certificate(b"not really a certificate");
        let text = fingerprint.to_string();
        assert!(text.starts_with("sha256:"));
        assert_eq!(text.len(), 7 + 64);
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fingerprint);

        let digits = &text[7..];
        assert_eq!(
            digits.parse::<Fingerprint>().unwrap_err(),
            FingerprintParseError::MissingPrefix {
                input: digits.to_owned()
            }
        );
        let short = &text[..text.len() - 1];
        assert!(matches!(
            short.parse::<Fingerprint>(),
            Err(FingerprintParseError::WrongLength { digits: 63, .. })
        ));
        let upper = format!("sha256:{}", digits.to_uppercase());
        if upper != text {
            assert!(matches!(
                upper.parse::<Fingerprint>(),
                Err(FingerprintParseError::NotLowercaseHex { .. })
            ));
        }
        let bad = format!("sha256:{}g", &digits[..63]);
        assert_eq!(
            bad.parse::<Fingerprint>().unwrap_err(),
            FingerprintParseError::NotLowercaseHex {
                input: bad.clone(),
                position: 7 + 63
            }
        );
        let message = "sha256:zz".parse::<Fingerprint>().unwrap_err().to_string();
        assert!(message.contains("lowercase hex"), "{message}");
    }

    #[test]
    fn identity_is_stable_across_reload_and_key_is_private() {
        let state_dir = tempfile::tempdir().unwrap();
        let keys_dir = state_dir.path().join("keys");
        let created = Identity::load_or_create(&keys_dir).unwrap();
        let key_mode = fs::metadata(keys_dir.join(KEY_FILE_NAME))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(key_mode, 0o600);
        let dir_mode = fs::metadata(&keys_dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);

        let reloaded = Identity::load_or_create(&keys_dir).unwrap();
        assert_eq!(reloaded.fingerprint, created.fingerprint);
        assert_eq!(reloaded.cert_der, created.cert_der);
        assert_eq!(
            reloaded.key_der.secret_pkcs8_der(),
            created.key_der.secret_pkcs8_der()
        );
        assert_eq!(
            created.fingerprint,
            Fingerprint::of_certificate(&created.cert_der)
        );

        let other = Identity::load_or_create(&state_dir.path().join("other")).unwrap();
        assert_ne!(other.fingerprint, created.fingerprint);
    }

    #[test]
    fn identity_refuses_open_key_missing_cert_and_foreign_cert() {
        let state_dir = tempfile::tempdir().unwrap();
        let keys_dir = state_dir.path().join("keys");
        Identity::load_or_create(&keys_dir).unwrap();
        let key_path = keys_dir.join(KEY_FILE_NAME);
        let cert_path = keys_dir.join(CERT_FILE_NAME);

        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
        let error = Identity::load_or_create(&keys_dir).unwrap_err();
        assert!(
            matches!(error, IdentityError::KeyFileTooOpen { mode: 0o644, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("chmod 600"));
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();

        let other_dir = state_dir.path().join("other");
        Identity::load_or_create(&other_dir).unwrap();
        fs::copy(other_dir.join(CERT_FILE_NAME), &cert_path).unwrap();
        let error = Identity::load_or_create(&keys_dir).unwrap_err();
        assert!(
            matches!(error, IdentityError::KeyMismatch { .. }),
            "{error}"
        );

        fs::remove_file(&cert_path).unwrap();
        let error = Identity::load_or_create(&keys_dir).unwrap_err();
        assert!(
            matches!(error, IdentityError::CertificateMissing { .. }),
            "{error}"
        );

        fs::write(&cert_path, "garbage").unwrap();
        let error = Identity::load_or_create(&keys_dir).unwrap_err();
        assert!(matches!(error, IdentityError::BadPem { .. }), "{error}");
    }
}
