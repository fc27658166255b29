//! Self-signed certificates for the TLS tests.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// A self-signed certificate and its key, as PEM.
pub struct Pem {
    pub cert: String,
    pub key: String,
}

impl Pem {
    pub fn for_names(names: &[&str]) -> Pem {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let certified = rcgen::generate_simple_self_signed(names).expect("certificate");
        Pem { cert: certified.cert.pem(), key: certified.signing_key.serialize_pem() }
    }

    pub fn write(&self, dir: &Path, name: &str) {
        std::fs::write(dir.join(format!("{name}.pem")), &self.cert).expect("write cert");
        std::fs::write(dir.join(format!("{name}.key")), &self.key).expect("write key");
    }

    pub fn leaf(&self) -> Vec<u8> {
        let first = CertificateDer::pem_slice_iter(self.cert.as_bytes()).next().expect("a certificate");
        first.expect("PEM").as_ref().to_vec()
    }
}
