//! HTTPS listeners: certificates chosen by SNI, ALPN h2, `X-Forwarded-Proto: https`, hot
//! reload (signal and file change), a changed `[[tls.cert]]` list on reload, a broken file
//! keeping the old certificate, the handshake timeout and the connection cap. Certificates are
//! made here with rcgen, signed by a test CA the client trusts.
//!
//! Not tested: refusing TLS 1.0/1.1. rustls (server and test client) has no such versions, so
//! there is nothing to negotiate them with; the server config lists 1.3 and 1.2 explicitly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme, SupportedProtocolVersion};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::support::{echo_headers, header_lines, TestGateway, TestUpstream};

/// A test CA and the directory its certificates are written to.
struct Pki {
    ca: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    dir: tempfile::TempDir,
}

/// A leaf certificate: what the server should present, and its PEM files' contents.
struct Leaf {
    der: CertificateDer<'static>,
    chain_pem: String,
    key_pem: String,
}

impl Pki {
    fn new() -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "wpf-gateway test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        Pki {
            ca,
            issuer: rcgen::Issuer::new(params, key),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn issue(&self, names: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            der: cert.der().clone(),
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn chain_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.pem"))
    }

    fn key_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.key"))
    }

    /// Write `leaf` as `NAME.pem` and `NAME.key`, in place.
    fn write(&self, name: &str, leaf: &Leaf) {
        std::fs::write(self.chain_path(name), &leaf.chain_pem).unwrap();
        std::fs::write(self.key_path(name), &leaf.key_pem).unwrap();
    }

    /// `[[tls.cert]]` tables for these names, the one at `default` marked so.
    fn config(&self, upstream: &str, names: &[&str], default: Option<usize>) -> String {
        let mut text = String::from(
            r#"
[server]
listen = ["127.0.0.1:0"]
data_dir = "{data_dir}"

[tls]
listen = ["127.0.0.1:0"]
"#,
        );
        for (i, name) in names.iter().enumerate() {
            text.push_str(&format!(
                "\n[[tls.cert]]\nchain = {:?}\nkey = {:?}\ndefault = {}\n",
                self.chain_path(name),
                self.key_path(name),
                default == Some(i)
            ));
        }
        text.push_str(&format!(
            "\n[[site]]\nname = \"main\"\nupstream = \"{upstream}\"\naccess_key = \"test-key-123\"\n"
        ));
        text
    }

    /// A client that trusts this CA only.
    fn connector(&self, alpn: &[&[u8]]) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let config = client_builder(rustls::ALL_VERSIONS)
            .with_root_certificates(roots)
            .with_no_client_auth();
        finish(config, alpn)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_builder(
    versions: &[&'static SupportedProtocolVersion],
) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
}

fn finish(mut config: rustls::ClientConfig, alpn: &[&[u8]]) -> TlsConnector {
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Every handshake a full one: a resumed session shows the certificate it started with.
    config.resumption = rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

/// Accepts any certificate (still checks the handshake signatures): to see which certificate
/// the server picks for names none of them covers.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn accept_any(versions: &[&'static SupportedProtocolVersion]) -> TlsConnector {
    let config = client_builder(versions)
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider())))
        .with_no_client_auth();
    finish(config, &[b"http/1.1"])
}

/// Handshake with `server_name` as SNI (an IP address sends no SNI).
async fn connect(
    addr: SocketAddr,
    server_name: &str,
    connector: &TlsConnector,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))?
}

fn served(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

async fn served_to(addr: SocketAddr, server_name: &str, connector: &TlsConnector) -> Vec<u8> {
    let stream = connect(addr, server_name, connector)
        .await
        .unwrap_or_else(|e| panic!("handshake for {server_name}: {e}"));
    served(&stream).to_vec()
}

/// An HTTP/1.1 client connection over TLS and its driver.
async fn h1_over(
    stream: TlsStream<TcpStream>,
) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

async fn h1_get(send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>) -> String {
    let req = Request::get("/page")
        .header("host", "a.test")
        .header("x-forwarded-proto", "http")
        .body(Empty::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

fn tls_addr(gw: &TestGateway) -> SocketAddr {
    gw.tls_addr.expect("gateway has an HTTPS listener")
}

/// A gateway serving one certificate, for `a.test` (files `a.pem` and `a.key`), with what
/// the reload tests use alongside it.
struct OneCert {
    /// Kept alive for the gateway's site.
    upstream: TestUpstream,
    pki: Pki,
    a: Leaf,
    gw: TestGateway,
    addr: SocketAddr,
    /// Trusts the test CA, ALPN http/1.1.
    verified: TlsConnector,
}

async fn one_cert() -> OneCert {
    let upstream = TestUpstream::start(echo_headers).await;
    let pki = Pki::new();
    let a = pki.issue(&["a.test"]);
    pki.write("a", &a);
    let gw = TestGateway::start(&pki.config(&upstream.url(), &["a"], None)).await;
    let addr = tls_addr(&gw);
    let verified = pki.connector(&[b"http/1.1"]);
    OneCert {
        upstream,
        pki,
        a,
        gw,
        addr,
        verified,
    }
}

#[tokio::test]
async fn sni_picks_the_certificate_and_unknown_or_absent_names_get_the_default() {
    let upstream = TestUpstream::start(echo_headers).await;
    let pki = Pki::new();
    let a = pki.issue(&["a.test"]);
    let b = pki.issue(&["b.test", "*.wild.test"]);
    let d = pki.issue(&["default.test"]);
    pki.write("a", &a);
    pki.write("b", &b);
    pki.write("d", &d);
    // The default is listed last: chosen by `default = true`, not by position.
    let gw = TestGateway::start(&pki.config(&upstream.url(), &["a", "b", "d"], Some(2))).await;
    let addr = tls_addr(&gw);
    let verified = pki.connector(&[b"http/1.1"]);
    assert_eq!(served_to(addr, "a.test", &verified).await, a.der.to_vec());
    assert_eq!(served_to(addr, "b.test", &verified).await, b.der.to_vec());
    assert_eq!(
        served_to(addr, "x.wild.test", &verified).await,
        b.der.to_vec()
    );
    assert_eq!(served_to(addr, "A.Test", &verified).await, a.der.to_vec());
    assert_eq!(
        served_to(addr, "default.test", &verified).await,
        d.der.to_vec()
    );
    // A verifying client refuses the default certificate for a name it does not cover.
    assert!(connect(addr, "other.test", &verified).await.is_err());

    let any = accept_any(rustls::ALL_VERSIONS);
    for name in ["other.test", "deep.x.wild.test", "wild.test", "127.0.0.1"] {
        assert_eq!(served_to(addr, name, &any).await, d.der.to_vec(), "{name}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn alpn_h2_reaches_the_upstream_with_forwarded_proto_https() {
    let upstream = TestUpstream::start(echo_headers).await;
    let pki = Pki::new();
    pki.write("a", &pki.issue(&["a.test"]));
    let gw = TestGateway::start(&pki.config(&upstream.url(), &["a"], None)).await;
    let addr = tls_addr(&gw);

    let stream = connect(addr, "a.test", &pki.connector(&[b"h2", b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get("https://a.test/over-h2?q=1")
        .header("x-forwarded-proto", "http")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let echo = resp.into_body().collect().await.unwrap().to_bytes();
    let echo = String::from_utf8(echo.to_vec()).unwrap();
    assert!(echo.starts_with("GET /over-h2?q=1 "), "{echo}");
    // Our own value, not the (untrusted) client's.
    assert_eq!(
        header_lines(&echo, "x-forwarded-proto"),
        ["https"],
        "{echo}"
    );
    assert_eq!(header_lines(&echo, "host"), ["a.test"], "{echo}");

    // ALPN http/1.1 is HTTP/1.1 over TLS, also https.
    let stream = connect(addr, "a.test", &pki.connector(&[b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let echo = h1_get(&mut h1_over(stream).await).await;
    assert_eq!(
        header_lines(&echo, "x-forwarded-proto"),
        ["https"],
        "{echo}"
    );

    // The plain listener next to it says http.
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let resp = client.get(gw.url("/").parse().unwrap()).await.unwrap();
    let echo = resp.into_body().collect().await.unwrap().to_bytes();
    let echo = String::from_utf8(echo.to_vec()).unwrap();
    assert_eq!(header_lines(&echo, "x-forwarded-proto"), ["http"], "{echo}");

    assert_eq!(gw.tls_stats.handshakes.load(Ordering::Relaxed), 2);
    assert_eq!(gw.tls_stats.handshake_failures.load(Ordering::Relaxed), 0);
    gw.stop().await;
}

#[tokio::test]
async fn tls_1_2_and_1_3_clients_are_both_served() {
    let upstream = TestUpstream::start(echo_headers).await;
    let pki = Pki::new();
    pki.write("a", &pki.issue(&["a.test"]));
    let gw = TestGateway::start(&pki.config(&upstream.url(), &["a"], None)).await;
    for (version, expected) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let stream = connect(tls_addr(&gw), "a.test", &accept_any(&[version]))
            .await
            .unwrap();
        assert_eq!(stream.get_ref().1.protocol_version(), Some(expected));
        let echo = h1_get(&mut h1_over(stream).await).await;
        assert_eq!(header_lines(&echo, "x-forwarded-proto"), ["https"]);
    }
    gw.stop().await;
}

#[tokio::test]
async fn reload_swaps_the_certificate_for_new_handshakes_only() {
    let t = one_cert().await;

    let open = connect(t.addr, "a.test", &t.verified).await.unwrap();
    assert_eq!(served(&open), t.a.der);
    let mut open = h1_over(open).await;
    h1_get(&mut open).await;

    let new = t.pki.issue(&["a.test", "www.a.test"]);
    t.pki.write("a", &new);
    t.gw.reload.reload().await.expect("reload succeeds");
    assert_eq!(
        served_to(t.addr, "a.test", &t.verified).await,
        new.der.to_vec()
    );
    assert_eq!(
        served_to(t.addr, "www.a.test", &t.verified).await,
        new.der.to_vec()
    );
    // The connection opened before the reload carries on.
    h1_get(&mut open).await;
    t.gw.stop().await;
}

#[tokio::test]
async fn a_broken_file_keeps_the_old_certificate() {
    let t = one_cert().await;
    // Served (so loaded) before the file breaks.
    assert_eq!(
        served_to(t.addr, "a.test", &t.verified).await,
        t.a.der.to_vec()
    );

    std::fs::write(
        t.pki.chain_path("a"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n",
    )
    .unwrap();
    let err =
        t.gw.reload
            .reload()
            .await
            .expect_err("broken chain refused");
    let chain = t.pki.chain_path("a").display().to_string();
    assert!(err.to_string().contains(&chain), "{err}");
    assert_eq!(
        served_to(t.addr, "a.test", &t.verified).await,
        t.a.der.to_vec()
    );

    // Renewal caught half-way: the new chain is in place, its key is not yet.
    let new = t.pki.issue(&["a.test"]);
    std::fs::write(t.pki.chain_path("a"), &new.chain_pem).unwrap();
    let err =
        t.gw.reload
            .reload()
            .await
            .expect_err("mismatched key refused");
    let key = t.pki.key_path("a").display().to_string();
    assert!(err.to_string().contains(&key), "{err}");
    assert!(!err.to_string().contains("PRIVATE KEY"), "{err}");
    assert_eq!(
        served_to(t.addr, "a.test", &t.verified).await,
        t.a.der.to_vec()
    );

    std::fs::write(t.pki.key_path("a"), &new.key_pem).unwrap();
    t.gw.reload.reload().await.expect("complete renewal loads");
    assert_eq!(
        served_to(t.addr, "a.test", &t.verified).await,
        new.der.to_vec()
    );
    t.gw.stop().await;
}

#[tokio::test]
async fn reload_with_a_changed_certificate_list_serves_and_watches_the_new_list() {
    let t = one_cert().await;
    let any = accept_any(rustls::ALL_VERSIONS);
    assert_eq!(served_to(t.addr, "b.test", &any).await, t.a.der.to_vec());
    let open = connect(t.addr, "a.test", &t.verified).await.unwrap();
    let mut open = h1_over(open).await;
    h1_get(&mut open).await;

    // Added, for a new name, and made the default.
    let b = t.pki.issue(&["b.test"]);
    t.pki.write("b", &b);
    t.gw.write_config(&t.pki.config(&t.upstream.url(), &["a", "b"], Some(1)));
    t.gw.reload
        .reload()
        .await
        .expect("reload with an added certificate");
    assert_eq!(
        served_to(t.addr, "b.test", &t.verified).await,
        b.der.to_vec()
    );
    assert_eq!(
        served_to(t.addr, "a.test", &t.verified).await,
        t.a.der.to_vec()
    );
    assert_eq!(served_to(t.addr, "other.test", &any).await, b.der.to_vec());

    // The file watch covers the added certificate's files.
    let renewed = t.pki.issue(&["b.test", "www.b.test"]);
    replace_file(&t.pki.key_path("b"), &renewed.key_pem);
    replace_file(&t.pki.chain_path("b"), &renewed.chain_pem);
    let started = Instant::now();
    while served_to(t.addr, "b.test", &any).await != renewed.der.to_vec() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "renewed certificate not served 10 s after its files changed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Removed: its names fall back to the default, the remaining certificate.
    t.gw.write_config(&t.pki.config(&t.upstream.url(), &["a"], None));
    t.gw.reload
        .reload()
        .await
        .expect("reload with a removed certificate");
    assert_eq!(served_to(t.addr, "b.test", &any).await, t.a.der.to_vec());
    assert_eq!(
        served_to(t.addr, "a.test", &t.verified).await,
        t.a.der.to_vec()
    );

    // The connection opened before both reloads carries on.
    h1_get(&mut open).await;
    t.gw.stop().await;
}

#[tokio::test]
async fn reload_with_a_broken_new_certificate_fails_and_the_old_ones_stay() {
    let t = one_cert().await;
    let any = accept_any(rustls::ALL_VERSIONS);

    let b = t.pki.issue(&["b.test"]);
    t.pki.write("b", &b);
    std::fs::write(
        t.pki.chain_path("b"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n",
    )
    .unwrap();
    t.gw.write_config(&t.pki.config(&t.upstream.url(), &["a", "b"], Some(1)));
    let err =
        t.gw.reload
            .reload()
            .await
            .expect_err("a broken new certificate fails the reload");
    let chain = t.pki.chain_path("b").display().to_string();
    assert!(err.to_string().contains(&chain), "{err}");
    assert_eq!(
        served_to(t.addr, "a.test", &t.verified).await,
        t.a.der.to_vec()
    );
    assert_eq!(served_to(t.addr, "b.test", &any).await, t.a.der.to_vec());

    // Once the file is whole, the same list loads.
    t.pki.write("b", &b);
    t.gw.reload.reload().await.expect("the repaired list loads");
    assert_eq!(
        served_to(t.addr, "b.test", &t.verified).await,
        b.der.to_vec()
    );
    t.gw.stop().await;
}

/// Replace `path` the way renewal tools do: write a new file, rename it over the old one.
fn replace_file(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn changed_files_are_picked_up_without_a_signal() {
    let t = one_cert().await;
    assert_eq!(
        served_to(t.addr, "a.test", &t.verified).await,
        t.a.der.to_vec()
    );

    let new = t.pki.issue(&["a.test"]);
    replace_file(&t.pki.key_path("a"), &new.key_pem);
    replace_file(&t.pki.chain_path("a"), &new.chain_pem);
    let started = Instant::now();
    loop {
        if served_to(t.addr, "a.test", &t.verified).await == new.der.to_vec() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "new certificate not served 10 s after the files changed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.gw.stop().await;
}

#[tokio::test]
async fn a_silent_client_is_dropped_at_the_handshake_timeout_without_blocking_others() {
    let upstream = TestUpstream::start(echo_headers).await;
    let pki = Pki::new();
    pki.write("a", &pki.issue(&["a.test"]));
    let gw = TestGateway::start_with(&pki.config(&upstream.url(), &["a"], None), |c| {
        c.server.header_read_timeout = Duration::from_millis(1500);
    })
    .await;
    let addr = tls_addr(&gw);
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();

    // Meanwhile other clients complete their handshakes: the silent one holds up nothing.
    let quick = Instant::now();
    let stream = connect(addr, "a.test", &pki.connector(&[b"http/1.1"]))
        .await
        .unwrap();
    assert!(
        quick.elapsed() < Duration::from_millis(1200),
        "{:?}",
        quick.elapsed()
    );
    drop(stream);

    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(6), silent.read_to_end(&mut out)).await;
    let elapsed = started.elapsed();
    assert!(closed.is_ok(), "silent connection still open after 6 s");
    assert!(elapsed >= Duration::from_millis(1400), "{elapsed:?}");
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(gw.tls_stats.handshake_failures.load(Ordering::Relaxed), 1);

    // Plain HTTP on the TLS port is a failed handshake, not a request.
    let answer = crate::support::raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
        Duration::from_secs(4),
    )
    .await;
    assert!(!answer.contains("200"), "{answer}");
    assert_eq!(gw.tls_stats.handshake_failures.load(Ordering::Relaxed), 2);
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 0);
    gw.stop().await;
}

#[tokio::test]
async fn tls_connections_count_toward_the_connection_cap() {
    let upstream = TestUpstream::start(echo_headers).await;
    let pki = Pki::new();
    pki.write("a", &pki.issue(&["a.test"]));
    let gw = TestGateway::start_with(&pki.config(&upstream.url(), &["a"], None), |c| {
        c.server.max_connections = 1;
    })
    .await;
    let addr = tls_addr(&gw);
    let connector = pki.connector(&[b"http/1.1"]);
    let first = connect(addr, "a.test", &connector).await.unwrap();
    let mut first = h1_over(first).await;
    h1_get(&mut first).await;

    // Over the cap: the TCP connection waits in the backlog, so no handshake.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("a.test").unwrap();
    let mut second = Box::pin(connector.connect(name, tcp));
    assert!(
        tokio::time::timeout(Duration::from_millis(400), &mut second)
            .await
            .is_err(),
        "second TLS connection served over the cap"
    );
    drop(first);
    let second = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("served once the first connection closed")
        .unwrap();
    h1_get(&mut h1_over(second).await).await;
    gw.stop().await;
}
