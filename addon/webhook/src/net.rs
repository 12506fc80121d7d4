//! Validation of the lists `trellis-proxy init` takes, with the same rules as its parser
//! (proxy/sidecar/src/capture/config.rs): so a value the injector accepts never makes the
//! capture step exit 64 in the pod.

use std::net::IpAddr;

/// The items of a comma-separated list, trimmed, empty ones dropped.
pub(crate) fn items(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|i| !i.is_empty())
}

/// A comma-separated list of ports 1-65535.
pub(crate) fn port_list(s: &str) -> Result<Vec<u16>, String> {
    items(s)
        .map(|p| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{p:?} is not a port (1-65535)")),
        })
        .collect()
}

/// A comma-separated list of CIDRs, each as [`check_cidr`].
pub(crate) fn cidr_list(s: &str) -> Result<Vec<String>, String> {
    items(s)
        .map(|c| check_cidr(c).map(|()| c.to_owned()))
        .collect()
}

/// `10.0.0.0/8`, `fd00::/8` or a bare address; no host bits after the prefix.
pub(crate) fn check_cidr(s: &str) -> Result<(), String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
    let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(p) if p <= max => p,
            _ => return Err(format!("{s:?}: prefix length must be 0-{max}")),
        },
    };
    let (bits, width) = match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    };
    let host_bits = u32::from(width - prefix);
    let host_mask = 1u128.checked_shl(host_bits).map_or(u128::MAX, |v| v - 1);
    if bits & host_mask != 0 {
        return Err(format!("{s:?} has host bits set after /{prefix}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_follow_the_capture_parser() {
        for ok in [
            "10.0.0.0/8",
            "10.1.2.3",
            "fd00:7e11::/64",
            "::1",
            "0.0.0.0/0",
            "::/0",
        ] {
            assert_eq!(check_cidr(ok), Ok(()), "{ok}");
        }
        for bad in [
            "10.1.2.3/8",
            "10.0.0.0/33",
            "fd00::1/64",
            "nope",
            "10.0.0.0/x",
            "",
        ] {
            assert!(check_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ports_are_1_to_65535() {
        assert_eq!(port_list(" 22, 8443,,"), Ok(vec![22, 8443]));
        assert_eq!(port_list(""), Ok(vec![]));
        for bad in ["0", "65536", "http", "80;81"] {
            assert!(port_list(bad).is_err(), "{bad}");
        }
    }
}
