//! kd-net: the transport shared by the coordinator, the agents and the bench.
//!
//! * [`tls`]: rustls configurations. Agents pin the coordinator's certificate by its SHA-256;
//!   agents authenticate each other with the certificates the coordinator issued for the
//!   deployment, checked against the exact fingerprints the coordinator announced.
//! * [`endpoint`]: QUIC endpoints with large UDP buffers and kd's transport parameters.
//! * [`wire`]: framed messages on QUIC streams, with size limits and timeouts; chunk frames
//!   read into and sent from shared `Bytes`.
//! * [`pace`]: the streams one sender serves move in step.
#![cfg_attr(test, allow(clippy::unwrap_used))]

/// Application close codes on kd connections.
pub mod close {
    /// Normal end.
    pub const DONE: u32 = 0;
    /// The peer was refused (bad Hello, not allowed).
    pub const REFUSED: u32 = 1;
}

pub mod endpoint;
pub mod pace;
pub mod tls;
pub mod wire;

/// SHA-256 of a DER certificate (what `kd.pin=` carries, in hex).
pub fn cert_sha256(der: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(der).into()
}

/// Parses a 64-digit hex SHA-256.
pub fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_roundtrip() {
        let d = super::cert_sha256(b"x");
        let h = kd_proto::manifest::hex(&d);
        assert_eq!(super::parse_sha256_hex(&h), Some(d));
        assert_eq!(super::parse_sha256_hex("zz"), None);
        assert_eq!(super::parse_sha256_hex(&"g".repeat(64)), None);
    }
}
