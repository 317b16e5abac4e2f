//! Pass-through proxy: streaming, headers, upgrades, errors, pooling, HTTP/2 clients.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::support::{
    echo_headers, header_lines, one_site_config, raw_exchange, site_config, TestGateway,
    TestUpstream,
};

const CHUNK: usize = 64 * 1024;
const CHUNKS: usize = 1024; // 64 MiB

/// Deterministic chunk `i` of the large test body.
fn chunk(i: usize) -> Bytes {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::with_capacity(CHUNK);
    while out.len() < CHUNK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    Bytes::from(out)
}

fn expected_digest() -> String {
    let mut h = Sha256::new();
    for i in 0..CHUNKS {
        h.update(chunk(i));
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

type ChannelBody =
    StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

fn channel_body(rx: mpsc::Receiver<Bytes>) -> ChannelBody {
    StreamBody::new(
        futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
        })
        .boxed(),
    )
}

#[tokio::test]
async fn large_upload_streams_through_unbuffered() {
    // The upstream reports its first bytes before the client has sent the second chunk: the
    // gateway cannot be buffering the body.
    let (first_tx, first_rx) = oneshot::channel::<()>();
    let first_tx = Arc::new(Mutex::new(Some(first_tx)));
    let upstream = TestUpstream::start(move |req| {
        let first_tx = first_tx.clone();
        async move {
            let mut body = req.into_body();
            let mut h = Sha256::new();
            let mut len = 0usize;
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame.expect("frame").into_data() else {
                    continue;
                };
                if let Some(tx) = first_tx.lock().unwrap().take() {
                    let _ = tx.send(());
                }
                len += data.len();
                h.update(&data);
            }
            hyper::Response::new(Full::new(Bytes::from(format!(
                "{len} {}",
                hex(&h.finalize())
            ))))
        }
    })
    .await;
    let gw = TestGateway::start(&one_site_config(&upstream.url())).await;
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let sender = tokio::spawn(async move {
        tx.send(chunk(0)).await.expect("send first");
        tokio::time::timeout(Duration::from_secs(10), first_rx)
            .await
            .expect("upstream saw the first chunk while the rest was unsent")
            .expect("signal");
        for i in 1..CHUNKS {
            tx.send(chunk(i)).await.expect("send");
        }
    });
    let client = Client::builder(TokioExecutor::new()).build_http::<ChannelBody>();
    let req = Request::post(gw.url("/upload"))
        .body(channel_body(rx))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(60), client.request(req))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    sender.await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!("{} {}", CHUNK * CHUNKS, expected_digest())
    );
    gw.stop().await;
}

#[tokio::test]
async fn large_download_streams_through_unbuffered() {
    // The client reads the first chunk before the upstream has sent the second.
    let (got_first_tx, got_first_rx) = oneshot::channel::<()>();
    let got_first_rx = Arc::new(Mutex::new(Some(got_first_rx)));
    let upstream = TestUpstream::start(move |_req| {
        let got_first = got_first_rx.lock().unwrap().take();
        async move {
            let (tx, rx) = mpsc::channel::<Bytes>(4);
            tokio::spawn(async move {
                let _ = tx.send(chunk(0)).await;
                if let Some(got_first) = got_first {
                    let _ = tokio::time::timeout(Duration::from_secs(10), got_first).await;
                }
                for i in 1..CHUNKS {
                    if tx.send(chunk(i)).await.is_err() {
                        return;
                    }
                }
            });
            hyper::Response::new(channel_body(rx))
        }
    })
    .await;
    let gw = TestGateway::start(&one_site_config(&upstream.url())).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let resp = client
        .get(gw.url("/download").parse().unwrap())
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut h = Sha256::new();
    let mut len = 0usize;
    let mut signal = Some(got_first_tx);
    let read_all = async {
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.expect("frame").into_data() else {
                continue;
            };
            len += data.len();
            h.update(&data);
            if let Some(tx) = signal.take() {
                tx.send(()).expect("upstream waiting");
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read_all)
        .await
        .expect("in time");
    assert_eq!(len, CHUNK * CHUNKS);
    assert_eq!(hex(&h.finalize()), expected_digest());
    gw.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let upstream = TestUpstream::start(|req| async move {
        let mut resp = echo_headers(req).await;
        let h = resp.headers_mut();
        h.insert("connection", "X-Resp-Hop".parse().unwrap());
        h.insert("x-resp-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("proxy-authenticate", "Basic".parse().unwrap());
        h.insert("trailer", "x-t".parse().unwrap());
        h.insert("upgrade", "h2c".parse().unwrap());
        h.insert("x-resp-kept", "1".parse().unwrap());
        resp
    })
    .await;
    let gw = TestGateway::start(&one_site_config(&upstream.url())).await;
    let answer = raw_exchange(
        gw.addr,
        b"GET /hop HTTP/1.1\r\nHost: example.com\r\nConnection: close, X-Secret-Hop\r\n\
          X-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic eA==\r\n\
          Proxy-Connection: keep-alive\r\nTE: trailers\r\nUpgrade: websocket\r\n\
          X-Kept: yes\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").expect("full answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    for gone in [
        "x-secret-hop",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "upgrade",
    ] {
        assert!(
            header_lines(body, gone).is_empty(),
            "{gone} reached upstream"
        );
    }
    assert_eq!(header_lines(body, "x-kept"), ["yes"]);
    let head = head.to_ascii_lowercase();
    for gone in [
        "x-resp-hop:",
        "keep-alive:",
        "proxy-authenticate:",
        "trailer:",
        "upgrade:",
    ] {
        assert!(!head.contains(gone), "{gone} reached client: {head}");
    }
    assert!(head.contains("x-resp-kept: 1"));
    gw.stop().await;
}

#[tokio::test]
async fn forwarded_for_from_untrusted_peer_is_replaced() {
    let upstream = TestUpstream::start(echo_headers).await;
    let gw = TestGateway::start(&one_site_config(&upstream.url())).await;
    let answer = raw_exchange(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\
          X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7\r\n\
          X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let body = answer.split_once("\r\n\r\n").expect("answer").1;
    assert_eq!(header_lines(body, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(header_lines(body, "x-forwarded-proto"), ["http"]);
    assert_eq!(header_lines(body, "x-forwarded-host"), ["example.com"]);
    gw.stop().await;
}

#[tokio::test]
async fn forwarded_for_from_trusted_proxy_is_appended() {
    let upstream = TestUpstream::start(echo_headers).await;
    let gw = TestGateway::start_with(&one_site_config(&upstream.url()), |c| {
        c.server.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    let answer = raw_exchange(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\
          X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7\r\n\
          X-Forwarded-Proto: https\r\nX-Forwarded-Host: www.example.com\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let body = answer.split_once("\r\n\r\n").expect("answer").1;
    assert_eq!(
        header_lines(body, "x-forwarded-for"),
        ["6.6.6.6, 7.7.7.7, 127.0.0.1"]
    );
    assert_eq!(header_lines(body, "x-forwarded-proto"), ["https"]);
    assert_eq!(header_lines(body, "x-forwarded-host"), ["www.example.com"]);
    gw.stop().await;
}

#[tokio::test]
async fn host_is_preserved_and_via_appended() {
    let upstream = TestUpstream::start(|req| async move {
        let mut resp = echo_headers(req).await;
        resp.headers_mut()
            .insert("via", "1.1 upstream-cache".parse().unwrap());
        resp
    })
    .await;
    let gw = TestGateway::start(&one_site_config(&upstream.url())).await;
    let answer = raw_exchange(
        gw.addr,
        b"GET /p?q=1 HTTP/1.1\r\nHost: Example.com:8443\r\nConnection: close\r\n\
          Via: 1.0 corp-proxy\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").expect("answer");
    assert!(body.starts_with("GET /p?q=1 HTTP/1.1"), "{body}");
    assert_eq!(header_lines(body, "host"), ["Example.com:8443"]);
    assert_eq!(
        header_lines(body, "via").join(", "),
        "1.0 corp-proxy, 1.1 wpf-gateway"
    );
    let via: Vec<&str> = head
        .lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(n, _)| n.eq_ignore_ascii_case("via"))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(via.join(", "), "1.1 upstream-cache, 1.1 wpf-gateway");
    gw.stop().await;
}

#[tokio::test]
async fn absolute_form_target_still_goes_to_site_upstream() {
    let upstream = TestUpstream::start(echo_headers).await;
    let gw = TestGateway::start(&one_site_config(&upstream.url())).await;
    let answer = raw_exchange(
        gw.addr,
        b"GET http://evil.test:9/steal?x=1 HTTP/1.1\r\nHost: evil.test:9\r\n\
          Connection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").expect("answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.starts_with("GET /steal?x=1 HTTP/1.1"), "{body}");
    // And CONNECT is never tunnelled anywhere.
    let answer = raw_exchange(
        gw.addr,
        b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    gw.stop().await;
}

#[tokio::test]
async fn websocket_echo_through_gateway() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            ws.send(msg).await.unwrap();
        }
    });
    let gw = TestGateway::start(&one_site_config(&format!("http://{upstream_addr}"))).await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/socket", gw.addr))
        .await
        .expect("handshake through gateway");
    assert_eq!(resp.status(), 101);
    use tokio_tungstenite::tungstenite::Message;
    for i in 0..3 {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo in time")
            .expect("open")
            .expect("message");
        assert_eq!(reply, Message::text(text));
    }
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    let reply = ws.next().await.unwrap().unwrap();
    assert_eq!(reply, Message::binary(vec![1u8, 2, 3]));
    ws.close(None).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), echo)
        .await
        .expect("upstream saw the close")
        .unwrap();
    gw.stop().await;
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let gw = TestGateway::start(&one_site_config(&format!("http://127.0.0.1:{port}"))).await;
    let answer = raw_exchange(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(answer.contains("text/html"));
    assert!(answer.contains("502 Bad Gateway"));
    gw.stop().await;
}

#[tokio::test]
async fn silent_upstream_is_504() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepts and reads, never answers.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let gw = TestGateway::start_with(&one_site_config(&format!("http://{addr}")), |c| {
        c.sites[0].upstream_timeout = Duration::from_millis(300);
    })
    .await;
    let started = std::time::Instant::now();
    let answer = raw_exchange(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(started.elapsed() < Duration::from_secs(3));
    silent.abort();
    gw.stop().await;
}

#[tokio::test]
async fn unknown_host_without_catch_all_is_421() {
    let upstream = TestUpstream::start(echo_headers).await;
    let gw = TestGateway::start(&site_config(&upstream.url(), &["example.com"])).await;
    let answer = raw_exchange(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 421"), "{answer}");
    let answer = raw_exchange(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: EXAMPLE.com:80\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
    gw.stop().await;
}

#[tokio::test]
async fn upstream_connection_is_kept_alive_and_reused() {
    let upstream = TestUpstream::start(echo_headers).await;
    let gw = TestGateway::start(&one_site_config(&upstream.url())).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    for i in 0..5 {
        let resp = client
            .get(gw.url(&format!("/n/{i}")).parse().unwrap())
            .await
            .expect("response");
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
    gw.stop().await;
}

#[tokio::test]
async fn http2_client_reaches_http1_upstream() {
    let upstream = TestUpstream::start(echo_headers).await;
    let gw = TestGateway::start(&one_site_config(&upstream.url())).await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let req = Request::post(gw.url("/h2?x=1"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    let resp = client.request(req).await.expect("h2 response");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.starts_with("POST /h2?x=1 HTTP/1.1"), "{body}");
    assert_eq!(header_lines(&body, "host"), [gw.addr.to_string()]);
    assert_eq!(header_lines(&body, "cookie"), ["a=1; b=2"]);
    assert_eq!(header_lines(&body, "via"), ["2 wpf-gateway"]);
    gw.stop().await;
}
