//! Certificates: the coordinator's long-lived identity (pinned by agents) and the per-deployment
//! CA that issues each agent the certificate it uses towards its peers.

use std::path::Path;

use anyhow::{Context, Result};
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
    /// Loads `coord.crt.der` / `coord.key.der` from `state_dir`, creating them once if absent.
    pub fn load_or_create(state_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("cannot create state directory {}", state_dir.display()))?;
        let cert = state_dir.join("coord.crt.der");
        let key = state_dir.join("coord.key.der");
        if cert.exists() && key.exists() {
            return Ok(Self {
                cert_der: std::fs::read(&cert)
                    .with_context(|| format!("read {}", cert.display()))?,
                key_der: std::fs::read(&key).with_context(|| format!("read {}", key.display()))?,
            });
        }
        let id = Self::generate()?;
        write_private(&key, &id.key_der)?;
        std::fs::write(&cert, &id.cert_der).with_context(|| format!("write {}", cert.display()))?;
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

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
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
}
