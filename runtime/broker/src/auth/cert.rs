//! The subject common name (CN) of an X.509 certificate, by a small DER walk.
//!
//! rustls has already verified the certificate chain against `client_ca` by the time this
//! runs; this only reads `tbsCertificate.subject` (RFC 5280 §4.1):
//!
//! ```text
//! Certificate ::= SEQUENCE { tbsCertificate SEQUENCE {
//!     [0] version OPTIONAL, serialNumber INTEGER, signature SEQUENCE, issuer Name,
//!     validity SEQUENCE, subject Name, ... }, ... }
//! Name ::= SEQUENCE OF SET OF SEQUENCE { type OID, value DirectoryString }
//! ```
//!
//! A subject with no CN, more than one CN (ambiguous), or an empty one is refused.

/// Why no user name could be taken from a certificate.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CertNameError {
    #[error("the certificate is not valid DER: {0}")]
    Der(&'static str),
    #[error("the certificate subject has no common name (CN)")]
    NoCommonName,
    #[error("the certificate subject has more than one common name (CN)")]
    SeveralCommonNames,
    #[error("the certificate's common name is empty or not a readable string")]
    BadCommonName,
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const INTEGER: u8 = 0x02;
const VERSION: u8 = 0xa0;
/// 2.5.4.3 (id-at-commonName).
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// One DER element: (tag, contents, what follows).
fn element(input: &[u8]) -> Result<(u8, &[u8], &[u8]), CertNameError> {
    let (&tag, rest) = input.split_first().ok_or(CertNameError::Der("truncated"))?;
    if tag & 0x1f == 0x1f {
        return Err(CertNameError::Der(
            "multi-byte tags are not used in certificates",
        ));
    }
    let (&first, rest) = rest.split_first().ok_or(CertNameError::Der("truncated"))?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return Err(CertNameError::Der("bad length"));
        }
        let length = rest[..count]
            .iter()
            .fold(0usize, |n, b| (n << 8) | usize::from(*b));
        (length, &rest[count..])
    };
    if rest.len() < length {
        return Err(CertNameError::Der("truncated"));
    }
    Ok((tag, &rest[..length], &rest[length..]))
}

fn expect(input: &[u8], want: u8) -> Result<(&[u8], &[u8]), CertNameError> {
    let (tag, contents, rest) = element(input)?;
    if tag != want {
        return Err(CertNameError::Der("unexpected element"));
    }
    Ok((contents, rest))
}

/// The subject CN of a DER certificate.
pub fn common_name(der: &[u8]) -> Result<String, CertNameError> {
    let (certificate, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(certificate, SEQUENCE)?;
    let mut rest = tbs;
    if rest.first() == Some(&VERSION) {
        rest = element(rest)?.2;
    }
    rest = expect(rest, INTEGER)?.1; // serialNumber
    rest = expect(rest, SEQUENCE)?.1; // signature
    rest = expect(rest, SEQUENCE)?.1; // issuer
    rest = expect(rest, SEQUENCE)?.1; // validity
    let (mut subject, _) = expect(rest, SEQUENCE)?;
    let mut found = None;
    while !subject.is_empty() {
        let (mut set, next) = expect(subject, SET)?;
        subject = next;
        while !set.is_empty() {
            let (attribute, next) = expect(set, SEQUENCE)?;
            set = next;
            let (oid, value) = expect(attribute, OID)?;
            if oid != COMMON_NAME {
                continue;
            }
            if found.is_some() {
                return Err(CertNameError::SeveralCommonNames);
            }
            let (tag, contents, _) = element(value)?;
            found = Some(directory_string(tag, contents)?);
        }
    }
    match found {
        None => Err(CertNameError::NoCommonName),
        Some(name) if name.is_empty() || name.chars().any(char::is_control) => {
            Err(CertNameError::BadCommonName)
        }
        Some(name) => Ok(name),
    }
}

/// Decodes the string types a CN uses in practice.
fn directory_string(tag: u8, contents: &[u8]) -> Result<String, CertNameError> {
    match tag {
        // UTF8String, PrintableString, IA5String
        0x0c | 0x13 | 0x16 => std::str::from_utf8(contents)
            .map(str::to_string)
            .map_err(|_| CertNameError::BadCommonName),
        // BMPString: UTF-16 big endian
        0x1e if contents.len().is_multiple_of(2) => {
            let units: Vec<u16> = contents
                .as_chunks::<2>()
                .0
                .iter()
                .map(|pair| u16::from_be_bytes(*pair))
                .collect();
            String::from_utf16(&units).map_err(|_| CertNameError::BadCommonName)
        }
        _ => Err(CertNameError::BadCommonName),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rcgen::{CertificateParams, DnType, DnValue, KeyPair};

    use super::*;

    fn certificate(subject: &[(DnType, DnValue)]) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["sensor.local".to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (kind, value) in subject {
            params.distinguished_name.push(kind.clone(), value.clone());
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_the_subject_cn() {
        let der = certificate(&[
            (
                DnType::CountryName,
                DnValue::PrintableString("DE".try_into().unwrap()),
            ),
            (
                DnType::OrganizationName,
                DnValue::Utf8String("Kitchen".into()),
            ),
            (DnType::CommonName, DnValue::Utf8String("sensor-1".into())),
        ]);
        assert_eq!(common_name(&der).unwrap(), "sensor-1");
        let der = certificate(&[(
            DnType::CommonName,
            DnValue::PrintableString("device 7".try_into().unwrap()),
        )]);
        assert_eq!(common_name(&der).unwrap(), "device 7");
        let der = certificate(&[(
            DnType::CommonName,
            DnValue::BmpString("büro".try_into().unwrap()),
        )]);
        assert_eq!(common_name(&der).unwrap(), "büro");
    }

    #[test]
    fn refuses_missing_ambiguous_and_empty_names() {
        let der = certificate(&[(DnType::OrganizationName, DnValue::Utf8String("x".into()))]);
        assert_eq!(common_name(&der), Err(CertNameError::NoCommonName));
        let der = certificate(&[]);
        assert_eq!(common_name(&der), Err(CertNameError::NoCommonName));
        let der = certificate(&[(DnType::CommonName, DnValue::Utf8String(String::new()))]);
        assert_eq!(common_name(&der), Err(CertNameError::BadCommonName));
    }

    fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if contents.len() < 0x80 {
            out.push(contents.len() as u8);
        } else {
            out.push(0x82);
            out.extend((contents.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(contents);
        out
    }

    /// A hand-built certificate skeleton: only what the walk reads.
    fn skeleton(names: &[&str]) -> Vec<u8> {
        let mut subject = Vec::new();
        for name in names {
            let mut attribute = tlv(OID, COMMON_NAME);
            attribute.extend(tlv(0x0c, name.as_bytes()));
            subject.extend(tlv(SET, &tlv(SEQUENCE, &attribute)));
        }
        let mut tbs = tlv(VERSION, &tlv(INTEGER, &[2]));
        tbs.extend(tlv(INTEGER, &[1]));
        for _ in 0..3 {
            tbs.extend(tlv(SEQUENCE, &[]));
        }
        tbs.extend(tlv(SEQUENCE, &subject));
        tlv(SEQUENCE, &tlv(SEQUENCE, &tbs))
    }

    #[test]
    fn several_common_names_are_ambiguous() {
        assert_eq!(common_name(&skeleton(&["one"])).unwrap(), "one");
        assert_eq!(
            common_name(&skeleton(&["one", "two"])),
            Err(CertNameError::SeveralCommonNames)
        );
        assert_eq!(
            common_name(&skeleton(&["tab\there"])),
            Err(CertNameError::BadCommonName)
        );
    }

    #[test]
    fn truncated_input_is_an_error() {
        let der = certificate(&[(DnType::CommonName, DnValue::Utf8String("abc".into()))]);
        for cut in 0..der.len() {
            assert!(common_name(&der[..cut]).is_err(), "cut at {cut}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = common_name(&bytes);
        }
    }
}
