//! Listeners: accept connections, serve HTTP/1.1 and HTTP/2 (auto-detected), and drain on
//! shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{Config, Gateway};

/// What the gateway knows about the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
}

/// Accept on every listener until `shutdown`, then wait for open connections to finish.
pub async fn serve(
    config: &Config,
    gateway: Arc<Gateway>,
    listeners: Vec<TcpListener>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    for listener in listeners {
        tracker.spawn(accept_loop(listener, gateway.clone(), shutdown.clone()));
    }
    tracker.close();
    shutdown.cancelled().await;
    let _ = tokio::time::timeout(config.server.shutdown_grace, tracker.wait()).await;
}

async fn accept_loop(listener: TcpListener, gateway: Arc<Gateway>, shutdown: CancellationToken) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => continue,
            },
        };
        let conn = ConnInfo {
            peer,
            local,
            tls: false,
        };
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let gateway = gateway.clone();
                async move { Ok::<_, std::convert::Infallible>(gateway.handle(req, conn).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}
