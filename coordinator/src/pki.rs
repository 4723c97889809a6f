//! Certificates: the coordinator's long-lived identity (pinned by agents) and the per-deployment
//! CA that issues each agent the certificate it uses towards its peers.

use std::path::Path;

use anyhow::{bail, Context, Result};
use kd_proto::msg::PeerIdentity;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// The coordinator's certificate and key (DER).
#[derive(Debug, Clone)]
pub struct CoordIdentity {
    /// DER certificate.
    pub cert_der: Vec<u8>,
    /// PKCS#8 DER key.
    pub key_der: Vec<u8>,
}

impl CoordIdentity {
    /// File name of the certificate in the state directory.
    pub const CERT_FILE: &'static str = "coord.crt.der";
    /// File name of the key in the state directory.
    pub const KEY_FILE: &'static str = "coord.key.der";

    /// Loads `coord.crt.der` / `coord.key.der` from `state_dir`, creating them once if absent.
    ///
    /// The state directory is created mode 0700 ([`crate::state::create_dir`]); the files are
    /// read or created under the state lock (two `kd-coord` started at once get the same
    /// identity); each file is written to a temporary file and renamed into place, the key with
    /// mode 0600 (an existing key with a wider mode is set back to 0600). A key that does not
    /// belong to the certificate is refused with what to do, instead of every connection
    /// failing later.
    pub fn load_or_create(state_dir: &Path) -> Result<Self> {
        crate::state::create_dir(state_dir)?;
        let _lock = crate::state::Lock::take(state_dir)?;
        let cert = state_dir.join(Self::CERT_FILE);
        let key = state_dir.join(Self::KEY_FILE);
        if cert.exists() && key.exists() {
            if crate::fsutil::ensure_mode(&key, 0o600)
                .with_context(|| format!("cannot set the mode of {} to 0600", key.display()))?
            {
                tracing::warn!("{} was readable by others: now mode 0600", key.display());
            }
            let id = Self {
                cert_der: std::fs::read(&cert)
                    .with_context(|| format!("read {}", cert.display()))?,
                key_der: std::fs::read(&key).with_context(|| format!("read {}", key.display()))?,
            };
            if let Err(why) = keys_match(&id.cert_der, &id.key_der) {
                bail!(
                    "the coordinator's key {} does not belong to its certificate {} ({why}): no \
                     agent could connect. Delete both files to make a new identity (kd-coord \
                     pin prints the new pin; deployments write it into the profiles), or put \
                     back the key that goes with this certificate",
                    key.display(),
                    cert.display()
                );
            }
            return Ok(id);
        }
        let id = Self::generate()?;
        // The key first: a certificate never names a key that is not there.
        crate::fsutil::write_atomic(&key, &id.key_der, 0o600)
            .with_context(|| format!("write {}", key.display()))?;
        crate::fsutil::write_atomic(&cert, &id.cert_der, 0o644)
            .with_context(|| format!("write {}", cert.display()))?;
        Ok(id)
    }

    /// A fresh self-signed identity.
    pub fn generate() -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["kd-coord".to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "kd coordinator");
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }

    /// SHA-256 of the certificate: what agents pin (`kd.pin=`).
    pub fn pin(&self) -> [u8; 32] {
        kd_net::cert_sha256(&self.cert_der)
    }
}

/// Whether the PKCS#8 key `key_der` is the private key of the certificate `cert_der` (their
/// public keys compared); `Err` says why not.
pub fn keys_match(cert_der: &[u8], key_der: &[u8]) -> Result<(), String> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = rustls::crypto::ring::default_provider();
    let key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key_der.to_vec(),
        )))
        .map_err(|e| format!("the key does not load: {e}"))?;
    let certified =
        rustls::sign::CertifiedKey::new(vec![CertificateDer::from(cert_der.to_vec())], key);
    match certified.keys_match() {
        Ok(()) => Ok(()),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err("their public keys differ".into())
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
        Err(e) => Err(format!("the certificate does not parse: {e}")),
    }
}

/// A CA that lives for one deployment and signs its agents' certificates.
pub struct DeploymentCa {
    issuer: rcgen::Issuer<'static, KeyPair>,
    ca_der: Vec<u8>,
}

impl std::fmt::Debug for DeploymentCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeploymentCa")
    }
}

impl DeploymentCa {
    /// A new CA for deployment `id`.
    pub fn new(id: u64) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("kd deployment {id:016x}"));
        let cert = params.self_signed(&key)?;
        Ok(Self {
            ca_der: cert.der().to_vec(),
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// Issues the certificate of `node`.
    pub fn issue(&self, node: &str) -> Result<PeerIdentity> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["kd-peer".to_string()])?;
        params.distinguished_name.push(DnType::CommonName, node);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(PeerIdentity {
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            ca_der: self.ca_der.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once() {
        let d = tempfile::tempdir().unwrap();
        let a = CoordIdentity::load_or_create(d.path()).unwrap();
        let b = CoordIdentity::load_or_create(d.path()).unwrap();
        assert_eq!(a.pin(), b.pin());
        let ca = DeploymentCa::new(7).unwrap();
        let n1 = ca.issue("node1").unwrap();
        let n2 = ca.issue("node2").unwrap();
        assert_ne!(n1.cert_der, n2.cert_der);
        // The configurations build from what was issued.
        kd_net::tls::coordinator_server(a.cert_der.clone(), a.key_der.clone()).unwrap();
        kd_net::tls::parent_server(n1.cert_der.clone(), n1.key_der, Default::default()).unwrap();
        kd_net::tls::child_to_parent([0; 32], n2.cert_der, n2.key_der).unwrap();
    }

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn chmod(p: &Path, m: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused_with_both_names() {
        let d = tempfile::tempdir().unwrap();
        let a = CoordIdentity::load_or_create(d.path()).unwrap();
        assert_eq!(keys_match(&a.cert_der, &a.key_der), Ok(()));
        let other = CoordIdentity::generate().unwrap();
        let key = d.path().join(CoordIdentity::KEY_FILE);
        std::fs::write(&key, &other.key_der).unwrap();
        let e = format!("{:#}", CoordIdentity::load_or_create(d.path()).unwrap_err());
        assert!(
            e.contains("coord.key.der")
                && e.contains("coord.crt.der")
                && e.contains("does not belong")
                && e.contains("Delete both files"),
            "{e}"
        );
        // Not a key at all: the same clear refusal.
        std::fs::write(&key, b"garbage").unwrap();
        let e = format!("{:#}", CoordIdentity::load_or_create(d.path()).unwrap_err());
        assert!(e.contains("does not load"), "{e}");
        // Deleting both makes a new identity.
        std::fs::remove_file(&key).unwrap();
        std::fs::remove_file(d.path().join(CoordIdentity::CERT_FILE)).unwrap();
        let b = CoordIdentity::load_or_create(d.path()).unwrap();
        assert_ne!(a.pin(), b.pin());
    }

    #[test]
    fn secrets_are_0600_whatever_existed_before() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join(CoordIdentity::KEY_FILE);
        let cert = d.path().join(CoordIdentity::CERT_FILE);
        let a = CoordIdentity::load_or_create(d.path()).unwrap();
        assert_eq!(mode(&key), 0o600);
        // An existing key readable by others is set back to 0600 on load.
        chmod(&key, 0o644);
        let b = CoordIdentity::load_or_create(d.path()).unwrap();
        assert_eq!(a.pin(), b.pin());
        assert_eq!(mode(&key), 0o600);
        // A 0644 key without its certificate: regenerated, and 0600.
        chmod(&key, 0o644);
        std::fs::remove_file(&cert).unwrap();
        let c = CoordIdentity::load_or_create(d.path()).unwrap();
        assert_ne!(a.pin(), c.pin());
        assert_eq!(mode(&key), 0o600);
        assert_eq!(
            keys_match(&c.cert_der, &std::fs::read(&key).unwrap()),
            Ok(())
        );
        // No temporary file left behind.
        let mut names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(names, [".lock", "coord.crt.der", "coord.key.der"]);
    }
}
