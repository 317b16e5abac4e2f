//! Server: timeouts, connection cap, idle keep-alive, graceful drain, access log, the binary.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::support::{echo_headers, one_site_config, raw_exchange, TestGateway, TestUpstream};

#[tokio::test]
async fn slowloris_is_cut_off_at_header_read_timeout() {
    let upstream = TestUpstream::start(echo_headers).await;
    let gw = TestGateway::start_with(&one_site_config(&upstream.url()), |c| {
        c.server.header_read_timeout = Duration::from_millis(500);
    })
    .await;
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let started = Instant::now();
    let dribble = tokio::spawn(async move {
        write.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await?;
        // One header byte every 100 ms: 50 bytes would take 5 s.
        for b in b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            write.write_all(&[*b]).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(4), read.read_to_end(&mut out)).await;
    let elapsed = started.elapsed();
    assert!(closed.is_ok(), "connection still open after 4 s");
    assert!(elapsed >= Duration::from_millis(450), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert!(!String::from_utf8_lossy(&out).contains(" 200 "));
    dribble.abort();
    assert_eq!(
        upstream.accepted.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    gw.stop().await;
}

#[tokio::test]
async fn oversized_request_head_is_refused() {
    let upstream = TestUpstream::start(echo_headers).await;
    let gw = TestGateway::start_with(&one_site_config(&upstream.url()), |c| {
        c.server.max_header_size = 16 * 1024;
    })
    .await;
    let big = "a".repeat(32 * 1024);
    let request = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n");
    let answer = raw_exchange(gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.100}");
    gw.stop().await;
}

/// An HTTP/1.1 client connection: its request handle and its driver task.
async fn h1_connection(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, driver)
}

fn get() -> Request<Empty<Bytes>> {
    Request::get("/")
        .header("host", "x")
        .body(Empty::new())
        .unwrap()
}

#[tokio::test]
async fn connection_cap_holds_the_third_connection_until_one_closes() {
    let upstream = TestUpstream::start(echo_headers).await;
    let gw = TestGateway::start_with(&one_site_config(&upstream.url()), |c| {
        c.server.max_connections = 2;
    })
    .await;
    let (mut a, a_driver) = h1_connection(gw.addr).await;
    let (mut b, _b_driver) = h1_connection(gw.addr).await;
    assert_eq!(a.send_request(get()).await.unwrap().status(), 200);
    assert_eq!(b.send_request(get()).await.unwrap().status(), 200);

    let (mut c, _c_driver) = h1_connection(gw.addr).await;
    let mut third = Box::pin(c.send_request(get()));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut third)
            .await
            .is_err(),
        "third connection served over the cap"
    );
    drop(a);
    a_driver.abort();
    let resp = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert_eq!(resp.status(), 200);
    gw.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let upstream = TestUpstream::start(echo_headers).await;
    let gw = TestGateway::start_with(&one_site_config(&upstream.url()), |c| {
        c.server.idle_timeout = Duration::from_millis(300);
    })
    .await;
    // HTTP/1.1: one request, then idle.
    let (mut send, driver) = h1_connection(gw.addr).await;
    let resp = send.send_request(get()).await.unwrap();
    resp.into_body().collect().await.unwrap();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("h1 idle connection closed")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));

    // HTTP/2 (prior knowledge): same.
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get("http://x/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("h2 idle connection closed")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
    gw.stop().await;
}

/// An upstream that tells the test when a request arrived and answers when released.
async fn held_upstream() -> (TestUpstream, mpsc::Receiver<oneshot::Sender<()>>) {
    let (arrived_tx, arrived_rx) = mpsc::channel::<oneshot::Sender<()>>(4);
    let upstream = TestUpstream::start(move |_req| {
        let arrived = arrived_tx.clone();
        async move {
            let (release_tx, release_rx) = oneshot::channel();
            let _ = arrived.send(release_tx).await;
            let _ = tokio::time::timeout(Duration::from_secs(10), release_rx).await;
            hyper::Response::new(Full::new(Bytes::from_static(b"finished")))
        }
    })
    .await;
    (upstream, arrived_rx)
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let (upstream, mut arrived) = held_upstream().await;
    let gw = TestGateway::start(&one_site_config(&upstream.url())).await;
    let url = gw.url("/slow");
    let request = tokio::spawn(async move {
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build_http::<Empty<Bytes>>();
        let resp = client.get(url.parse().unwrap()).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
    });
    let release = tokio::time::timeout(Duration::from_secs(5), arrived.recv())
        .await
        .expect("request reached upstream")
        .unwrap();
    gw.shutdown.cancel();
    // Draining has begun once the listener is gone.
    let mut refused = false;
    for _ in 0..200 {
        if TcpStream::connect(gw.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "still accepting after shutdown");
    let mut task = gw.task;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut task)
            .await
            .is_err(),
        "returned before the in-flight request finished"
    );
    release.send(()).unwrap();
    let (status, body) = request.await.unwrap().expect("in-flight request completed");
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"finished");
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("run returned after the drain")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn shutdown_grace_bounds_the_drain() {
    let (upstream, mut arrived) = held_upstream().await;
    let gw = TestGateway::start_with(&one_site_config(&upstream.url()), |c| {
        c.server.shutdown_grace = Duration::from_millis(200);
    })
    .await;
    let url = gw.url("/stuck");
    let request = tokio::spawn(async move {
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build_http::<Empty<Bytes>>();
        client.get(url.parse().unwrap()).await
    });
    let _release = tokio::time::timeout(Duration::from_secs(5), arrived.recv())
        .await
        .expect("request reached upstream")
        .unwrap();
    let started = Instant::now();
    gw.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(3), gw.task)
        .await
        .expect("run returned after the grace")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));
    let outcome = tokio::time::timeout(Duration::from_secs(3), request)
        .await
        .expect("client sees the cut")
        .unwrap();
    assert!(outcome.is_err(), "request cut off after the grace");
}

/// The real binary, its stdout lines and the address it listens on.
struct Binary {
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    line_rx: mpsc::UnboundedReceiver<String>,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Binary {
    async fn start(upstream: &str) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let config =
            one_site_config(upstream).replace("{data_dir}", &dir.path().display().to_string());
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wpf-gateway"))
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn gateway");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut line_rx) = mpsc::unbounded_channel();
        for reader in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(reader).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    lines.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        let addr = loop {
            let line = tokio::time::timeout(Duration::from_secs(10), line_rx.recv())
                .await
                .expect("gateway logs its address")
                .expect("gateway running");
            if let Some(rest) = line.split_once("addr=").map(|(_, r)| r) {
                if line.contains("listening") {
                    break rest.split_whitespace().next().unwrap().parse().unwrap();
                }
            }
        };
        Binary {
            child,
            lines,
            line_rx,
            addr,
            _dir: dir,
        }
    }

    async fn wait_for_line(&mut self, needle: &str) -> String {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(10), self.line_rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no line with {needle:?}"))
                .expect("gateway output open");
            if line.contains(needle) {
                return line;
            }
        }
    }

    fn terminate(&self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

#[tokio::test]
async fn binary_drains_on_sigterm_and_exits_zero() {
    let (upstream, mut arrived) = held_upstream().await;
    let mut gw = Binary::start(&upstream.url()).await;
    let url = format!("http://{}/slow", gw.addr);
    let request = tokio::spawn(async move {
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build_http::<Empty<Bytes>>();
        let resp = client.get(url.parse().unwrap()).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
    });
    let release = tokio::time::timeout(Duration::from_secs(10), arrived.recv())
        .await
        .expect("request reached upstream")
        .unwrap();
    gw.terminate();
    gw.wait_for_line("draining").await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), gw.child.wait())
            .await
            .is_err(),
        "exited before the in-flight request finished"
    );
    release.send(()).unwrap();
    let (status, body) = request.await.unwrap().expect("in-flight request completed");
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"finished");
    let exit = tokio::time::timeout(Duration::from_secs(10), gw.child.wait())
        .await
        .expect("process exits after the drain")
        .unwrap();
    assert!(exit.success(), "exit status {exit:?}");
}

#[tokio::test]
async fn access_log_line_redacts_access_key() {
    let upstream = TestUpstream::start(echo_headers).await;
    let mut gw = Binary::start(&upstream.url()).await;
    let answer = raw_exchange(
        gw.addr,
        b"GET /page?x=1&access_key=SECRETKEY&y=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let line = gw.wait_for_line("status=200").await;
    assert!(line.contains("access"), "{line}");
    assert!(line.contains("/page?x=1&access_key=***&y=2"), "{line}");
    assert!(line.contains("method=GET"), "{line}");
    assert!(line.contains("bytes="), "{line}");
    gw.terminate();
    let exit = tokio::time::timeout(Duration::from_secs(10), gw.child.wait())
        .await
        .expect("exit")
        .unwrap();
    assert!(exit.success());
    let all = gw.lines.lock().unwrap().join("\n");
    assert!(!all.contains("SECRETKEY"), "{all}");
}
