//! Small x509-parser helpers shared by the bundle, SVID and verification code.

use std::time::{Duration, SystemTime};

use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::Error;

/// Parses one DER certificate, refusing trailing bytes so that a certificate cannot smuggle
/// a second structure past a parser that stops early.
pub(crate) fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, Error> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(Error::BadCertificate(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        ))),
        Err(e) => Err(Error::BadCertificate(e.to_string())),
    }
}

/// `NotBefore` and `NotAfter` as Unix seconds.
pub(crate) fn validity_secs(cert: &X509Certificate<'_>) -> (i64, i64) {
    let v = cert.validity();
    (v.not_before.timestamp(), v.not_after.timestamp())
}

/// Converts Unix seconds (possibly before 1970) into a `SystemTime`.
pub(crate) fn system_time(secs: i64) -> Result<SystemTime, Error> {
    let delta = Duration::from_secs(secs.unsigned_abs());
    let t = if secs >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(delta)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(delta)
    };
    t.ok_or(Error::BadValidity)
}
