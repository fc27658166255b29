use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, KeyPair};
use surge_config::{CertificateFiles, Site};

use super::*;

/// A self-signed certificate for `names` and its key, as PEM.
fn self_signed(names: &[&str], expired: bool) -> (String, String) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("valid names");
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("certificate");
    (cert.pem(), key.serialize_pem())
}

fn files(dir: &Path, name: &str) -> CertificateFiles {
    let site =
        |key: &str| Site { key: key.into(), ..Site::new("", Path::new("surge.toml"), 0..0, key.into()) };
    CertificateFiles {
        cert: dir.join(format!("{name}.pem")),
        cert_site: site("gateway.tls[0].cert"),
        key: dir.join(format!("{name}.key")),
        key_site: site("gateway.tls[0].key"),
    }
}

fn write(dir: &Path, name: &str, (cert, key): &(String, String)) -> CertificateFiles {
    let files = files(dir, name);
    std::fs::write(&files.cert, cert).expect("write cert");
    std::fs::write(&files.key, key).expect("write key");
    files
}

/// The DER of the leaf served for `name`.
fn served(certificates: &Certificates, name: Option<&str>) -> Vec<u8> {
    let key = certificates.choose(name).expect("a certificate");
    key.cert[0].as_ref().to_vec()
}

fn leaf_der(pem: &str) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).next().expect("one").expect("pem").as_ref().to_vec()
}

fn only_error(result: Result<Arc<Certificates>, ConfigErrors>) -> ConfigError {
    let errors = result.expect_err("loading fails").0;
    assert_eq!(errors.len(), 1, "{errors:?}");
    errors.into_iter().next().expect("one error")
}

#[test]
fn names_match_exactly_or_by_one_wildcard_label() {
    assert!(names_match("a.test", "a.test"));
    assert!(names_match("a.test", "A.Test"));
    assert!(!names_match("a.test", "b.test"));
    assert!(names_match("*.b.test", "x.b.test"));
    assert!(!names_match("*.b.test", "b.test"));
    assert!(!names_match("*.b.test", "y.x.b.test"));
    assert!(!names_match("*.b.test", ".b.test"));
}

#[test]
fn sni_chooses_the_certificate_that_names_the_host_else_the_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = self_signed(&["a.test"], false);
    let b = self_signed(&["*.b.test", "b.test"], false);
    let loaded =
        Certificates::load(&[write(dir.path(), "a", &a), write(dir.path(), "b", &b)]).expect("loads");
    assert_eq!(served(&loaded, Some("a.test")), leaf_der(&a.0));
    assert_eq!(served(&loaded, Some("www.b.test")), leaf_der(&b.0));
    assert_eq!(served(&loaded, Some("b.test")), leaf_der(&b.0));
    assert_eq!(served(&loaded, Some("other.test")), leaf_der(&a.0));
    assert_eq!(served(&loaded, None), leaf_der(&a.0));
}

#[test]
fn a_missing_file_is_named_with_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let error = only_error(Certificates::load(&[files(dir.path(), "absent")]));
    assert_eq!(error.site.key, "gateway.tls[0].cert");
    assert!(error.message.contains("absent.pem: cannot read it"), "{}", error.message);
}

#[test]
fn a_file_that_is_not_pem_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = write(dir.path(), "text", &("hello\n".into(), "world\n".into()));
    let error = only_error(Certificates::load(&[files]));
    assert_eq!(error.site.key, "gateway.tls[0].cert");
    assert!(error.message.contains("text.pem: holds no certificate"), "{}", error.message);

    let (cert, _) = self_signed(&["a.test"], false);
    let files = write(dir.path(), "nokey", &(cert, "-----BEGIN PRIVATE KEY-----\n!!!\n".into()));
    let error = only_error(Certificates::load(&[files]));
    assert_eq!(error.site.key, "gateway.tls[0].key");
    assert!(error.message.contains("nokey.key: not a PEM private key"), "{}", error.message);
}

#[test]
fn a_key_of_another_certificate_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, _) = self_signed(&["a.test"], false);
    let (_, other_key) = self_signed(&["b.test"], false);
    let error = only_error(Certificates::load(&[write(dir.path(), "mixed", &(cert, other_key))]));
    assert_eq!(error.site.key, "gateway.tls[0].key");
    assert!(error.message.contains("does not belong to the certificate in"), "{}", error.message);
}

#[test]
fn an_expired_certificate_is_refused_with_its_date() {
    let dir = tempfile::tempdir().expect("tempdir");
    let error = only_error(Certificates::load(&[write(dir.path(), "old", &self_signed(&["a.test"], true))]));
    assert!(error.message.contains("expired on Fri, 01 Jan 2021"), "{}", error.message);
}

#[test]
fn changed_files_are_reloaded_and_broken_ones_keep_the_old_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = self_signed(&["a.test"], false);
    let files = write(dir.path(), "a", &first);
    let loaded = Certificates::load(std::slice::from_ref(&files)).expect("loads");
    assert!(!loaded.reload_if_changed().expect("nothing changed"));

    // A half-written key: refused, the first certificate stays in use.
    let second = self_signed(&["a.test"], false);
    std::fs::write(&files.cert, &second.0).expect("write");
    std::fs::write(&files.key, "").expect("truncate");
    bump(&files.key);
    assert!(loaded.reload_if_changed().is_err());
    assert_eq!(served(&loaded, Some("a.test")), leaf_der(&first.0));

    std::fs::write(&files.key, &second.1).expect("write");
    bump(&files.key);
    assert!(loaded.reload_if_changed().expect("reloads"));
    assert_eq!(served(&loaded, Some("a.test")), leaf_der(&second.0));
}

/// Moves a file's modification time on, so that a rewrite within the same clock tick shows.
fn bump(path: &PathBuf) {
    use std::sync::atomic::{AtomicU64, Ordering};
    // Distinct per call, so that two bumps never land on the same time.
    static LATER: AtomicU64 = AtomicU64::new(10);
    let later = SystemTime::now() + Duration::from_secs(LATER.fetch_add(10, Ordering::Relaxed));
    let file = std::fs::File::options().write(true).open(path).expect("open");
    file.set_modified(later).expect("set mtime");
}
