use std::io::{Read, Write};

use rustls::{ClientConnection, Connection, ProtocolVersion, ServerConnection};

use super::*;
use crate::matrix::{Fixture, TD};
use crate::test_util::LeafOptions;

const H2: &[u8] = b"h2";

/// What each side made of one in-memory handshake.
struct Outcome {
    client: Result<(), rustls::Error>,
    server: Result<(), rustls::Error>,
    /// The server's identity as the client sees it.
    client_saw: Option<SpiffeId>,
    /// The client's identity as the server sees it.
    server_saw: Option<SpiffeId>,
    client_conn: Connection,
    server_conn: Connection,
}

/// Drives a client and a server against each other through byte buffers until both finish
/// the handshake or one fails (then the alert is delivered to the other side too).
fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>, name: &str) -> Outcome {
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let mut c = Connection::Client(ClientConnection::new(client, name).unwrap());
    let mut s = Connection::Server(ServerConnection::new(server).unwrap());
    let (mut c_res, mut s_res) = (Ok(()), Ok(()));
    for _ in 0..20 {
        transfer(&mut c, &mut s);
        if s_res.is_ok() {
            s_res = s.process_new_packets().map(drop);
        }
        transfer(&mut s, &mut c);
        if c_res.is_ok() {
            c_res = c.process_new_packets().map(drop);
        }
        let done = !c.is_handshaking() && !s.is_handshaking();
        if (done || c_res.is_err() || s_res.is_err()) && !c.wants_write() && !s.wants_write() {
            break;
        }
    }
    Outcome {
        client_saw: c.peer_certificates().and_then(peer_identity),
        server_saw: s.peer_certificates().and_then(peer_identity),
        client: c_res,
        server: s_res,
        client_conn: c,
        server_conn: s,
    }
}

/// Moves everything `from` wants to send into `to`.
fn transfer(from: &mut Connection, to: &mut Connection) {
    let mut buf = Vec::new();
    while from.wants_write() {
        if from.write_tls(&mut buf).unwrap() == 0 {
            break;
        }
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        // A side that already failed may refuse further input; that is fine here.
        if to.read_tls(&mut rd).unwrap_or(0) == 0 {
            break;
        }
    }
}

/// Recovers our error from what the verifier handed rustls (see `to_rustls`).
fn reason(err: &rustls::Error) -> Option<Error> {
    use webpki::Error as W;
    let rustls::Error::InvalidCertificate(cert_err) = err else {
        return None;
    };
    Some(match cert_err {
        CertificateError::ExpiredContext { time, not_after } => Error::Untrusted(W::CertExpired {
            time: *time,
            not_after: *not_after,
        }),
        CertificateError::NotValidYetContext { time, not_before } => {
            Error::Untrusted(W::CertNotValidYet {
                time: *time,
                not_before: *not_before,
            })
        }
        CertificateError::UnknownIssuer => Error::Untrusted(W::UnknownIssuer),
        CertificateError::Other(OtherError(e)) => e.downcast_ref::<Error>()?.clone(),
        _ => return None,
    })
}

fn mtls(fx: &Fixture, client_auth: ClientAuth) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    let bundle = fx.ca.bundle();
    let client = client_config(
        Some(&fx.ca.issue(&fx.client_id)),
        &bundle,
        &fx.server_id,
        &[H2],
    );
    let server = server_config(&fx.ca.issue(&fx.server_id), &bundle, client_auth, &[H2]);
    (client.unwrap(), server.unwrap())
}

#[test]
fn mtls_pair_reports_both_identities() {
    let fx = Fixture::new();
    let (client, server) = mtls(&fx, ClientAuth::Required);
    let mut out = handshake(client, server, "mesh.invalid");
    out.client.unwrap();
    out.server.unwrap();
    assert_eq!(out.server_saw.as_ref(), Some(&fx.client_id));
    assert_eq!(out.client_saw.as_ref(), Some(&fx.server_id));
    assert_eq!(
        out.client_conn.protocol_version(),
        Some(ProtocolVersion::TLSv1_3)
    );
    assert_eq!(out.client_conn.alpn_protocol(), Some(H2));

    out.client_conn.writer().write_all(b"ping").unwrap();
    transfer(&mut out.client_conn, &mut out.server_conn);
    out.server_conn.process_new_packets().unwrap();
    let mut got = [0; 4];
    out.server_conn.reader().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
}

#[test]
fn client_ignores_server_name() {
    let fx = Fixture::new();
    for name in [
        "unrelated.example.com",
        "10.0.0.1",
        "server.demo.svc.cluster.local",
    ] {
        let (client, server) = mtls(&fx, ClientAuth::Required);
        let out = handshake(client, server, name);
        assert!(out.client.is_ok() && out.server.is_ok(), "{name}");
        assert_eq!(out.client_saw.as_ref(), Some(&fx.server_id), "{name}");
    }
}

#[test]
fn mtls_through_intermediates_is_accepted_when_the_intermediate_is_sent() {
    let fx = Fixture::new();
    let bundle = fx.ca.bundle();
    let via = |id| {
        fx.ca.issue_with(LeafOptions {
            via_intermediate: true,
            ..LeafOptions::new(id)
        })
    };
    let client = build_client_config(Some(via(&fx.client_id)), &bundle, &fx.server_id, &[]);
    let (chain, key) = via(&fx.server_id);
    assert_eq!(chain.len(), 2);
    let server = build_server_config(chain, key, TD, &bundle, ClientAuth::Required, &[]);
    let out = handshake(client.unwrap(), server.unwrap(), "mesh.invalid");
    out.client.unwrap();
    out.server.unwrap();
    assert_eq!(out.server_saw.as_ref(), Some(&fx.client_id));
    assert_eq!(out.client_saw.as_ref(), Some(&fx.server_id));
}

#[test]
fn server_rejects_every_malformed_client_certificate() {
    let fx = Fixture::new();
    let bundle = fx.ca.bundle();
    let server = server_config(
        &fx.ca.issue(&fx.server_id),
        &bundle,
        ClientAuth::Required,
        &[],
    )
    .unwrap();
    for case in fx.rejected(PeerRole::Client) {
        let cert = Some((case.chain, case.key));
        let client = build_client_config(cert, &bundle, &fx.server_id, &[]).unwrap();
        let out = handshake(client, server.clone(), "mesh.invalid");
        let err = out.server.expect_err(&case.name);
        let why = reason(&err).unwrap_or_else(|| panic!("{}: unexpected {err:?}", case.name));
        assert!((case.check)(&why), "{}: wrong reason: {why}", case.name);
        assert!(out.client.is_err(), "{}: client not told", case.name);
    }
}

#[test]
fn client_rejects_every_malformed_server_certificate() {
    let fx = Fixture::new();
    let bundle = fx.ca.bundle();
    let client_svid = fx.ca.issue(&fx.client_id);
    let client = client_config(Some(&client_svid), &bundle, &fx.server_id, &[]).unwrap();
    for case in fx.rejected(PeerRole::Server) {
        let server =
            build_server_config(case.chain, case.key, TD, &bundle, ClientAuth::Required, &[])
                .unwrap();
        let out = handshake(client.clone(), server, "mesh.invalid");
        let err = out.client.expect_err(&case.name);
        let why = reason(&err).unwrap_or_else(|| panic!("{}: unexpected {err:?}", case.name));
        assert!((case.check)(&why), "{}: wrong reason: {why}", case.name);
        assert!(
            out.server_saw.is_none(),
            "{}: server saw the client",
            case.name
        );
    }
}

#[test]
fn server_rejects_client_with_two_uri_sans() {
    let fx = Fixture::new();
    let bundle = fx.ca.bundle();
    let (chain, key) = fx.ca.issue_with(LeafOptions {
        uri_sans: vec![fx.client_id.to_string(), fx.server_id.to_string()],
        ..LeafOptions::new(&fx.client_id)
    });
    let client = build_client_config(Some((chain, key)), &bundle, &fx.server_id, &[]).unwrap();
    let (_, server) = mtls(&fx, ClientAuth::Required);
    let out = handshake(client, server, "mesh.invalid");
    let why = reason(&out.server.unwrap_err());
    assert!(matches!(why, Some(Error::MultipleUriSans(2))), "{why:?}");
}

#[test]
fn client_rejects_server_with_unexpected_identity() {
    let fx = Fixture::new();
    let bundle = fx.ca.bundle();
    let expected = SpiffeId::new(TD, "demo", "database").unwrap();
    let client = client_config(Some(&fx.ca.issue(&fx.client_id)), &bundle, &expected, &[]).unwrap();
    let (_, server) = mtls(&fx, ClientAuth::Required);
    let out = handshake(client, server, "mesh.invalid");
    let why = reason(&out.client.unwrap_err());
    assert!(
        matches!(&why, Some(Error::IdentityMismatch { expected: e, actual })
            if *e == expected && *actual == fx.server_id),
        "{why:?}"
    );
}

#[test]
fn server_requiring_client_auth_refuses_client_without_certificate() {
    let fx = Fixture::new();
    let (_, server) = mtls(&fx, ClientAuth::Required);
    let client = client_config(None, &fx.ca.bundle(), &fx.server_id, &[]).unwrap();
    let out = handshake(client, server, "mesh.invalid");
    assert_eq!(
        out.server.unwrap_err(),
        rustls::Error::NoCertificatesPresented
    );
    assert!(out.client.is_err());
}

#[test]
fn server_with_optional_client_auth_accepts_anonymous_client() {
    let fx = Fixture::new();
    let (_, server) = mtls(&fx, ClientAuth::Optional);
    let client = client_config(None, &fx.ca.bundle(), &fx.server_id, &[]).unwrap();
    let out = handshake(client, server, "mesh.invalid");
    out.client.unwrap();
    out.server.unwrap();
    assert_eq!(out.server_saw, None);
    assert_eq!(out.client_saw.as_ref(), Some(&fx.server_id));
}

#[test]
fn server_with_optional_client_auth_still_verifies_presented_certificate() {
    let fx = Fixture::new();
    let (client, server) = mtls(&fx, ClientAuth::Optional);
    let out = handshake(client, server, "mesh.invalid");
    out.server.unwrap();
    assert_eq!(out.server_saw.as_ref(), Some(&fx.client_id));

    let (chain, key) = fx.other_ca.issue_with(LeafOptions::new(&fx.client_id));
    let client = build_client_config(Some((chain, key)), &fx.ca.bundle(), &fx.server_id, &[]);
    let (_, server) = mtls(&fx, ClientAuth::Optional);
    let out = handshake(client.unwrap(), server, "mesh.invalid");
    let why = reason(&out.server.unwrap_err());
    assert!(matches!(why, Some(Error::Untrusted(_))), "{why:?}");
}

#[test]
fn configs_refuse_a_key_that_is_not_the_leafs() {
    let fx = Fixture::new();
    let (chain, _) = fx.ca.issue_with(LeafOptions::new(&fx.server_id));
    let (_, other_key) = fx.ca.issue_with(LeafOptions::new(&fx.server_id));
    let got = build_server_config(
        chain,
        other_key,
        TD,
        &fx.ca.bundle(),
        ClientAuth::Required,
        &[],
    );
    assert!(matches!(got, Err(Error::Key(_))), "{got:?}");
}

#[test]
fn peer_identity_is_none_without_certificates() {
    assert_eq!(peer_identity(&[]), None);
}
