//! How fast the CA signs, and what one new mesh mTLS handshake costs.
//!
//! ```text
//! cargo run --release -p trellis-ca --example ca_bench [-- SECONDS_PER_MEASUREMENT]
//! ```
//!
//! Everything runs on one thread, so the figures are per core. Three measurements:
//!
//! 1. `CertificateAuthority::sign` with a plug-in style CA (root + local intermediate from
//!    `generate_pems`): CSR parsing, key-type and policy checks, the CSR's self-signature,
//!    building and signing the leaf. CSRs are made beforehand (that is the proxy's work).
//! 2. The same through `IdentityService::certify` called directly: plus ES256 token
//!    verification, the rate limiter (set out of the way) and the response.
//! 3. A full TLS 1.3 mutual handshake between two leaves of that CA, both ends in memory
//!    with `trellis_identity::{client_config, server_config}`: the time is client plus
//!    server CPU, with chain and SPIFFE checks on both sides.
//!
//! Each figure is reported against wall time and against this thread's CPU time (from
//! `/proc/thread-self/stat`), so a busy machine shows up as the two disagreeing.

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConnection, Connection, ServerConnection};
use trellis_api::identity::v1::CertifyRequest;
use trellis_api::identity::v1::identity_server::Identity;
use trellis_ca::{
    CaMaterial, CertificateAuthority, DEFAULT_AUDIENCE, IdentityService, LocalIssuer, Metrics,
    RateLimit, generate_pems,
};
use trellis_identity::{ClientAuth, SpiffeId, Svid, TrustBundle};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const TD: &str = "cluster.local";
const DAY: Duration = Duration::from_secs(24 * 3600);
/// CSRs cycled through: enough that nothing is accidentally cached.
const CSR_POOL: usize = 64;

fn main() -> Result<()> {
    let seconds: f64 = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 3.0,
    };
    let budget = Duration::from_secs_f64(seconds);
    let pems = generate_pems(TD, "bench", 365 * DAY, 30 * DAY)?;
    let ca = Arc::new(CertificateAuthority::new(
        TD,
        CaMaterial::from_pems(&pems, TD, "bench")?,
    )?);
    let web = SpiffeId::new(TD, "demo", "web")?;
    let csrs = (0..CSR_POOL)
        .map(|_| trellis_identity::generate_csr(&web).map(|c| c.csr_der))
        .collect::<std::result::Result<Vec<_>, _>>()?;

    println!(
        "trellis-ca bench: one thread, {seconds} s per measurement, CA = root + local intermediate (ECDSA P-256)"
    );

    // 1. Signing.
    let mut i = 0;
    let sign = measure(budget, || {
        i += 1;
        ca.sign(&csrs[i % CSR_POOL], &web, None)?;
        Ok(())
    })?;
    sign.report("CA sign (CSR parse + checks + leaf)", "certificates");

    // 2. Certify, token to response.
    let issuer = LocalIssuer::generate()?;
    let token = issuer.mint("demo", "web", DEFAULT_AUDIENCE, DAY)?;
    let service = IdentityService::new(
        ca.clone(),
        Arc::new(issuer.verifier(DEFAULT_AUDIENCE)?),
        Metrics::new(&mut Registry::default()),
    )
    .with_rate_limit(RateLimit::new(u32::MAX, 1e9)?);
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let mut i = 0;
    let certify = measure(budget, || {
        i += 1;
        let request = tonic::Request::new(CertifyRequest {
            csr_der: csrs[i % CSR_POOL].clone(),
            token: token.clone(),
            requested_ttl_seconds: 0,
        });
        rt.block_on(service.certify(request))
            .map(drop)
            .map_err(|s| s.to_string().into())
    })?;
    certify.report("Certify RPC (token + CSR + leaf)", "certificates");

    // 3. Handshakes.
    let client_id = SpiffeId::new(TD, "demo", "client")?;
    let client_svid = svid(&ca, &client_id)?;
    let server_svid = svid(&ca, &web)?;
    let bundle = TrustBundle::from_der(ca.trust_bundle_der())?;
    let server =
        trellis_identity::server_config(&server_svid, &bundle, ClientAuth::Required, &[b"h2"])?;
    let client = trellis_identity::client_config(Some(&client_svid), &bundle, &web, &[b"h2"])?;
    // Once, checked: both sides see the other's identity.
    let (saw_server, saw_client) = handshake(&client, &server)?;
    if saw_server.as_ref() != Some(&web) || saw_client.as_ref() != Some(&client_id) {
        return Err(format!("handshake saw {saw_server:?} / {saw_client:?}").into());
    }
    let hs = measure(budget, || handshake(&client, &server).map(drop))?;
    hs.report(
        "mTLS handshake (TLS 1.3, client + server, leaf + intermediate)",
        "handshakes",
    );
    Ok(())
}

/// Issues a leaf for `id` and pairs it with its key.
fn svid(ca: &CertificateAuthority, id: &SpiffeId) -> Result<Svid> {
    let csr = trellis_identity::generate_csr(id)?;
    let issued = ca.sign(&csr.csr_der, id, None)?;
    let chain = issued
        .chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    Ok(Svid::new(chain, csr.key)?)
}

/// One complete handshake through in-memory buffers; returns the identities each side
/// saw (server as seen by the client, client as seen by the server).
fn handshake(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
) -> Result<(Option<SpiffeId>, Option<SpiffeId>)> {
    let name = ServerName::try_from("mesh.invalid")?;
    let mut c = Connection::Client(ClientConnection::new(client.clone(), name)?);
    let mut s = Connection::Server(ServerConnection::new(server.clone())?);
    let mut buf = Vec::with_capacity(8192);
    for _ in 0..10 {
        transfer(&mut c, &mut s, &mut buf)?;
        s.process_new_packets()?;
        transfer(&mut s, &mut c, &mut buf)?;
        c.process_new_packets()?;
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
            let saw_server = c
                .peer_certificates()
                .and_then(trellis_identity::peer_identity);
            let saw_client = s
                .peer_certificates()
                .and_then(trellis_identity::peer_identity);
            return Ok((saw_server, saw_client));
        }
    }
    Err("handshake did not finish".into())
}

fn transfer(from: &mut Connection, to: &mut Connection, buf: &mut Vec<u8>) -> Result<()> {
    buf.clear();
    while from.wants_write() {
        if from.write_tls(buf)? == 0 {
            break;
        }
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        if to.read_tls(&mut rd)? == 0 {
            break;
        }
    }
    Ok(())
}

/// Operations done in a measurement, with wall and CPU time.
struct Measured {
    ops: u64,
    wall: Duration,
    cpu: Option<Duration>,
}

/// Runs `op` for a short warm-up, then for `budget`.
fn measure(budget: Duration, mut op: impl FnMut() -> Result<()>) -> Result<Measured> {
    let warm = Instant::now();
    while warm.elapsed() < budget / 10 {
        op()?;
    }
    let cpu0 = thread_cpu();
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < budget {
        op()?;
        ops += 1;
    }
    let wall = start.elapsed();
    let cpu = match (cpu0, thread_cpu()) {
        (Some(a), Some(b)) => b.checked_sub(a),
        _ => None,
    };
    Ok(Measured { ops, wall, cpu })
}

impl Measured {
    fn report(&self, what: &str, unit: &str) {
        let per_wall = self.ops as f64 / self.wall.as_secs_f64();
        let us_wall = self.wall.as_secs_f64() * 1e6 / self.ops as f64;
        print!(
            "{what}: {} {unit} in {:.2} s wall: {per_wall:.0}/s, {us_wall:.1} us each",
            self.ops,
            self.wall.as_secs_f64()
        );
        match self.cpu {
            Some(cpu) if !cpu.is_zero() => {
                let per_cpu = self.ops as f64 / cpu.as_secs_f64();
                let us_cpu = cpu.as_secs_f64() * 1e6 / self.ops as f64;
                println!(
                    "; {:.2} s CPU: {per_cpu:.0} per CPU-second, {us_cpu:.1} us CPU each",
                    cpu.as_secs_f64()
                );
            }
            _ => println!("; CPU time unavailable"),
        }
    }
}

/// This thread's user + system CPU time, from `/proc/thread-self/stat` (Linux), in
/// clock ticks of 10 ms (USER_HZ is 100 on every Linux Trellis supports).
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // The command name may hold spaces; fields resume after its closing parenthesis.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}
