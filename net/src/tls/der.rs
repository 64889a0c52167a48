//! Just enough DER to read a name out of a peer's X.509 certificate for logs. Every read is
//! bounds-checked and any surprise gives `None`: the certificate is peer input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
const TAG_OID: u8 = 0x06;
const TAG_BOOLEAN: u8 = 0x01;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_UTF8_STRING: u8 = 0x0c;
const TAG_PRINTABLE_STRING: u8 = 0x13;
const TAG_IA5_STRING: u8 = 0x16;
/// `[0] EXPLICIT Version` in `TBSCertificate`.
const TAG_VERSION: u8 = 0xa0;
/// `[3] EXPLICIT Extensions` in `TBSCertificate`.
const TAG_EXTENSIONS: u8 = 0xa3;
/// `[2] IMPLICIT IA5String` dNSName in `GeneralName`.
const TAG_DNS_NAME: u8 = 0x82;
/// `[7] IMPLICIT OCTET STRING` iPAddress in `GeneralName`.
const TAG_IP_ADDRESS: u8 = 0x87;
/// id-at-commonName, 2.5.4.3.
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// id-ce-subjectAltName, 2.5.29.17.
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
/// Long-form lengths of up to 4 bytes (4 GiB) cover any certificate; longer is malformed.
const LENGTH_BYTES_MAX: usize = 4;

/// Splits one element off `input`: its tag, its contents, and the bytes after it.
pub(super) fn next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // multi-byte tags never occur in the fields read here
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > LENGTH_BYTES_MAX {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(count)?;
        let len = bytes.iter().try_fold(0usize, |acc, &b| {
            acc.checked_mul(256)?.checked_add(usize::from(b))
        })?;
        (len, rest)
    };
    let (value, rest) = rest.split_at_checked(len)?;
    Some((tag, value, rest))
}

/// The contents of the element at the start of `input` if it has tag `tag`.
fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    match next(input)? {
        (t, value, rest) if t == tag => Some((value, rest)),
        _ => None,
    }
}

/// Every element of a SEQUENCE or SET's contents.
fn elements(mut input: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (tag, value, rest) = next(input)?;
        input = rest;
        Some((tag, value))
    })
}

/// `TBSCertificate`'s subject and, if present, extensions.
fn subject_and_extensions(cert: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    let (cert, _) = expect(cert, TAG_SEQUENCE)?;
    let (mut tbs, _) = expect(cert, TAG_SEQUENCE)?;
    if tbs.first() == Some(&TAG_VERSION) {
        tbs = next(tbs)?.2;
    }
    // serialNumber, signature, issuer, validity
    for _ in 0..4 {
        tbs = next(tbs)?.2;
    }
    let (subject, rest) = expect(tbs, TAG_SEQUENCE)?;
    // subjectPublicKeyInfo, then optional issuerUniqueID, subjectUniqueID, extensions
    let (_, _, mut rest) = next(rest)?;
    let mut extensions = None;
    while let Some((tag, value, after)) = next(rest) {
        if tag == TAG_EXTENSIONS {
            extensions = Some(expect(value, TAG_SEQUENCE)?.0);
        }
        rest = after;
    }
    Some((subject, extensions))
}

pub(super) fn subject_common_name(cert: &[u8]) -> Option<String> {
    let (subject, _) = subject_and_extensions(cert)?;
    elements(subject)
        .filter(|&(tag, _)| tag == TAG_SET)
        .flat_map(|(_, rdn)| elements(rdn))
        .filter(|&(tag, _)| tag == TAG_SEQUENCE)
        .find_map(|(_, attribute)| {
            let (oid, rest) = expect(attribute, TAG_OID)?;
            if oid != OID_COMMON_NAME {
                return None;
            }
            match next(rest)? {
                (TAG_UTF8_STRING | TAG_PRINTABLE_STRING | TAG_IA5_STRING, value, _) => {
                    String::from_utf8(value.to_vec()).ok()
                }
                _ => None,
            }
        })
}

pub(super) fn first_subject_alt_name(cert: &[u8]) -> Option<String> {
    let (_, extensions) = subject_and_extensions(cert)?;
    let san = elements(extensions?)
        .filter(|&(tag, _)| tag == TAG_SEQUENCE)
        .find_map(|(_, extension)| {
            let (oid, mut rest) = expect(extension, TAG_OID)?;
            if oid != OID_SUBJECT_ALT_NAME {
                return None;
            }
            if rest.first() == Some(&TAG_BOOLEAN) {
                rest = next(rest)?.2; // critical
            }
            let (octets, _) = expect(rest, TAG_OCTET_STRING)?;
            Some(expect(octets, TAG_SEQUENCE)?.0)
        })?;
    elements(san).find_map(|(tag, value)| match tag {
        TAG_DNS_NAME => String::from_utf8(value.to_vec()).ok(),
        TAG_IP_ADDRESS => match value.len() {
            4 => <[u8; 4]>::try_from(value)
                .ok()
                .map(|b| IpAddr::from(Ipv4Addr::from(b)).to_string()),
            16 => <[u8; 16]>::try_from(value)
                .ok()
                .map(|b| IpAddr::from(Ipv6Addr::from(b)).to_string()),
            _ => None,
        },
        _ => None,
    })
}
