//! Test harness: start the gateway in-process and small real upstream servers.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
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

/// A gateway running in this process.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), wpf_gateway::RunError>>,
    pub dir: tempfile::TempDir,
}

impl TestGateway {
    /// Start from config text; `{data_dir}` is replaced by a fresh temporary directory and
    /// `server.listen` is replaced by one listener on 127.0.0.1:0.
    pub async fn start(config_toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = config_toml.replace("{data_dir}", &dir.path().display().to_string());
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, &text).expect("write config");
        let config = wpf_gateway::config::load(Path::new(&path)).expect("valid test config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let listeners = wpf_gateway::Listeners {
            http: vec![listener],
        };
        let task = tokio::spawn(wpf_gateway::run(config, listeners, shutdown.clone()));
        TestGateway {
            addr,
            shutdown,
            task,
            dir,
        }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// Cancel and wait for `run` to return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// A real upstream HTTP server (hyper, HTTP/1.1 + h2c) answering with `handler`.
pub struct TestUpstream {
    pub addr: SocketAddr,
    pub task: JoinHandle<()>,
}

impl TestUpstream {
    pub async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handler = Arc::new(handler);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
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
        TestUpstream { addr, task }
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
