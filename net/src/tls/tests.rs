//! Unit tests of the TLS module's private helpers.

use super::*;

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn der_lengths_are_bounds_checked() {
    assert_eq!(
        der::next(&[0x04, 0x02, 0xaa, 0xbb, 0xcc]),
        Some((0x04, &[0xaa, 0xbb][..], &[0xcc][..]))
    );
    assert_eq!(
        der::next(&[0x04, 0x81, 0x01, 0xaa]),
        Some((0x04, &[0xaa][..], &[][..]))
    );
    // Truncated contents, truncated length, indefinite length, oversized length, no input.
    assert_eq!(der::next(&[0x04, 0x03, 0xaa]), None);
    assert_eq!(der::next(&[0x04, 0x82, 0x01]), None);
    assert_eq!(der::next(&[0x30, 0x80, 0x00, 0x00]), None);
    assert_eq!(der::next(&[0x04, 0x85, 1, 0, 0, 0, 0]), None);
    assert_eq!(der::next(&[0x04, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    assert_eq!(der::next(&[]), None);
    assert_eq!(der::next(&[0x1f, 0x01, 0x00]), None);
}

#[test]
fn names_are_read_from_a_generated_certificate() {
    let ca_key = generate_key("CA key").expect("generate CA key");
    let issuer = Issuer::new(ca_params(&ca_key).expect("CA params"), ca_key);
    let (cert, _key) =
        sign_node(&issuer, "east-1", &names(&["10.0.0.7", "east.example"])).expect("sign node");
    assert_eq!(
        der::subject_common_name(cert.der()).as_deref(),
        Some("east-1")
    );
    assert_eq!(
        der::first_subject_alt_name(cert.der()).as_deref(),
        Some("10.0.0.7")
    );
}

#[test]
fn garbage_certificates_give_no_name() {
    let mut cert = {
        let ca_key = generate_key("CA key").expect("generate CA key");
        let issuer = Issuer::new(ca_params(&ca_key).expect("CA params"), ca_key);
        let (cert, _) = sign_node(&issuer, "n", &names(&["n.example"])).expect("sign node");
        cert.der().to_vec()
    };
    // Every truncation of a real certificate must be handled without a panic.
    while !cert.is_empty() {
        cert.pop();
        let _ = der::subject_common_name(&cert);
        let _ = der::first_subject_alt_name(&cert);
    }
    assert_eq!(der::subject_common_name(&[0x30, 0x00]), None);
}

#[test]
fn ca_name_is_derived_from_its_key() {
    let key = generate_key("CA key").expect("generate CA key");
    let other = generate_key("CA key").expect("generate CA key");
    let a = ca_params(&key).expect("CA params").distinguished_name;
    let b = ca_params(&key).expect("CA params").distinguished_name;
    let c = ca_params(&other).expect("CA params").distinguished_name;
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn names_are_validated() {
    assert!(matches!(validate_names(&[]), Err(TlsError::NoNames)));
    assert!(matches!(
        validate_names(&names(&["not a name"])),
        Err(TlsError::InvalidName { .. })
    ));
    assert!(validate_names(&names(&["localhost", "127.0.0.1", "::1", "a.example"])).is_ok());
    let many: Vec<String> = (0..=NAMES_MAX).map(|i| format!("n{i}.example")).collect();
    assert!(matches!(
        validate_names(&many),
        Err(TlsError::TooManyNames { .. })
    ));
    for bad in ["", "../x", "a/b", ".hidden", "ca", "sp ace"] {
        assert!(validate_node_name(bad).is_err(), "{bad:?} accepted");
    }
    for good in ["east", "node-2", "dc1.rack_3"] {
        assert!(validate_node_name(good).is_ok(), "{good:?} refused");
    }
}
