//! Test harness: start the gateway in-process and small real upstream servers.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wpf_gateway::Config;

/// A gateway running in this process.
pub struct TestGateway {
    pub addr: SocketAddr,
    /// The HTTPS listener, when the config has `[tls]` (its `listen` is replaced like
    /// `server.listen`).
    pub tls_addr: Option<SocketAddr>,
    /// The admin listener, when the config has `admin.listen` (replaced by 127.0.0.1:0).
    pub admin_addr: Option<SocketAddr>,
    /// What SIGHUP does.
    pub reload: wpf_gateway::ReloadHandle,
    pub tls_stats: Arc<wpf_gateway::tls::TlsStats>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), wpf_gateway::RunError>>,
    pub dir: tempfile::TempDir,
}

impl TestGateway {
    /// Start from config text; `{data_dir}` is replaced by a fresh temporary directory and
    /// `server.listen` is replaced by one listener on 127.0.0.1:0.
    pub async fn start(config_toml: &str) -> Self {
        Self::start_with(config_toml, |_| {}).await
    }

    /// Like [`TestGateway::start`], with `adjust` editing the loaded config first (for keys the
    /// test TOML cannot express).
    pub async fn start_with(config_toml: &str, adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in_with(dir, config_toml, adjust).await
    }

    /// Like [`TestGateway::start`], in the data directory a stopped gateway left behind (see
    /// [`TestGateway::stop_keeping_dir`]): a restart on the same queue, locks and activity.
    pub async fn start_in(dir: tempfile::TempDir, config_toml: &str) -> Self {
        Self::start_in_with(dir, config_toml, |_| {}).await
    }

    async fn start_in_with(
        dir: tempfile::TempDir,
        config_toml: &str,
        adjust: impl FnOnce(&mut Config),
    ) -> Self {
        let text = config_toml.replace("{data_dir}", &dir.path().display().to_string());
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, &text).expect("write config");
        let mut config = wpf_gateway::config::load(Path::new(&path)).expect("valid test config");
        adjust(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut tls = Vec::new();
        let mut tls_addr = None;
        if !config.tls.listen.is_empty() {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tls");
            tls_addr = Some(listener.local_addr().expect("tls addr"));
            tls.push(listener);
        }
        let mut admin = None;
        let mut admin_addr = None;
        if config.admin.listen.is_some() {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
            admin_addr = Some(listener.local_addr().expect("admin addr"));
            admin = Some(listener);
        }
        let shutdown = CancellationToken::new();
        let listeners = wpf_gateway::Listeners {
            http: vec![listener],
            tls,
            admin,
        };
        let (reload, reloads) = wpf_gateway::reload_channel();
        let tls_stats = Arc::new(wpf_gateway::tls::TlsStats::default());
        let options = wpf_gateway::RunOptions {
            reload: Some(reloads),
            tls_stats: tls_stats.clone(),
        };
        let task = tokio::spawn(wpf_gateway::run_with(
            config,
            listeners,
            shutdown.clone(),
            options,
        ));
        TestGateway {
            addr,
            tls_addr,
            admin_addr,
            reload,
            tls_stats,
            shutdown,
            task,
            dir,
        }
    }

    /// Replace the config file with `config_toml` (`{data_dir}` replaced as at start), for a
    /// reload to read.
    pub fn write_config(&self, config_toml: &str) {
        let text = config_toml.replace("{data_dir}", &self.dir.path().display().to_string());
        std::fs::write(self.dir.path().join("gateway.toml"), text).expect("write config");
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// A URL on the admin listener (the config must have `admin.listen`).
    pub fn admin_url(&self, path_and_query: &str) -> String {
        let addr = self.admin_addr.expect("config has admin.listen");
        format!("http://{addr}{path_and_query}")
    }

    /// Cancel and wait for `run` to return.
    pub async fn stop(self) {
        drop(self.stop_keeping_dir().await);
    }

    /// Cancel, wait for `run` to return, and hand back the data directory (for
    /// [`TestGateway::start_in`], or to inspect what the gateway left on disk).
    pub async fn stop_keeping_dir(self) -> tempfile::TempDir {
        self.shutdown.cancel();
        let _ = self.task.await;
        self.dir
    }
}

/// A real upstream HTTP server (hyper, HTTP/1.1 + h2c) answering with `handler`; counts the
/// connections it accepted.
pub struct TestUpstream {
    pub addr: SocketAddr,
    pub task: JoinHandle<()>,
    pub accepted: Arc<AtomicUsize>,
}

impl TestUpstream {
    pub async fn start<F, Fut, B>(handler: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<B>> + Send + 'static,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handler = Arc::new(handler);
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(handler(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TestUpstream {
            addr,
            task,
            accepted,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A minimal config with one catch-all site in front of `upstream`.
pub fn one_site_config(upstream: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
data_dir = "{{data_dir}}"

[[site]]
name = "main"
upstream = "{upstream}"
access_key = "test-key-123"
"#
    )
}

/// The request headers an upstream saw, as one `name: value` line each (repeated headers stay
/// separate lines), answered as the body.
pub async fn echo_headers(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut text = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
    for (name, value) in req.headers() {
        text.push_str(&format!(
            "{}: {}\n",
            name,
            value.to_str().unwrap_or("<bin>")
        ));
    }
    Response::new(Full::new(Bytes::from(text)))
}

/// Values of header `name` in an [`echo_headers`] answer.
pub fn header_lines<'a>(echo: &'a str, name: &str) -> Vec<&'a str> {
    echo.lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .collect()
}

/// A config with one catch-all site and the given extra `[[site]]` lines.
pub fn site_config(upstream: &str, hosts: &[&str]) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
data_dir = "{{data_dir}}"

[[site]]
name = "main"
hosts = {hosts:?}
upstream = "{upstream}"
access_key = "test-key-123"
"#
    )
}

/// Send raw bytes on a fresh connection and read the whole answer until the server closes
/// (bounded by `limit`).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], limit: std::time::Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A complete answer, as the webhook and admin tests read it.
#[derive(Debug)]
pub struct Reply {
    pub status: hyper::StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON; the answer must say `application/json`.
    pub fn json(&self) -> serde_json::Value {
        assert_eq!(
            self.headers
                .get(hyper::header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap()),
            Some("application/json"),
            "{self:?}"
        );
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Send one request (a fresh connection each time) and read the whole answer, within 10 s.
pub async fn send(req: Request<Full<Bytes>>) -> Reply {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let exchange = async {
        let resp = client.request(req).await.expect("answer");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), exchange)
        .await
        .expect("answer in time")
}

/// A real SMTP listener on 127.0.0.1:0 that accepts every mail (no TLS, no AUTH) and keeps
/// each message's raw DATA, for welcome-mail tests.
pub struct SmtpSink {
    pub addr: SocketAddr,
    pub mails: Arc<std::sync::Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl SmtpSink {
    pub async fn start() -> Self {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind smtp");
        let addr = listener.local_addr().expect("smtp addr");
        let mails = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = mails.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read);
                    let _ = write.write_all(b"220 sink ESMTP\r\n").await;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match lines.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                        let answer: &[u8] = match verb.as_str() {
                            "EHLO" | "HELO" => b"250 sink\r\n",
                            "DATA" => {
                                let _ = write.write_all(b"354 go ahead\r\n").await;
                                let mut data = String::new();
                                loop {
                                    line.clear();
                                    match lines.read_line(&mut line).await {
                                        Ok(0) | Err(_) => return,
                                        Ok(_) if line == ".\r\n" => break,
                                        Ok(_) => data.push_str(&line),
                                    }
                                }
                                kept.lock().unwrap().push(data);
                                b"250 queued\r\n"
                            }
                            "QUIT" => {
                                let _ = write.write_all(b"221 bye\r\n").await;
                                return;
                            }
                            _ => b"250 ok\r\n",
                        };
                        if write.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        SmtpSink { addr, mails, task }
    }

    pub fn mails(&self) -> Vec<String> {
        self.mails.lock().unwrap().clone()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Poll `probe` every 20 ms until it returns `Some`; panics naming `what` after 10 s.
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
