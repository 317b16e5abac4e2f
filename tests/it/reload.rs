//! Live reload of the configuration: a changed upstream takes over while a long request
//! stays open; an invalid file is refused with its FILE:LINE problems and changes nothing.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::support::{TestGateway, TestUpstream};

fn config(upstream: &str, key: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\ndata_dir = \"{{data_dir}}\"\n\n[[site]]\n\
         name = \"main\"\nupstream = \"{upstream}\"\naccess_key = \"{key}\"\n"
    )
}

async fn get(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    url: String,
) -> (u16, String) {
    let resp = tokio::time::timeout(Duration::from_secs(10), client.get(url.parse().unwrap()))
        .await
        .expect("answer in time")
        .expect("answer");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn reload_switches_the_upstream_while_a_long_request_stays_open() {
    let old = TestUpstream::start(|req: hyper::Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        hyper::Response::new(http_body_util::Full::new(Bytes::from("old")))
    })
    .await;
    let new = TestUpstream::start(|_req| async move {
        hyper::Response::new(http_body_util::Full::new(Bytes::from("new")))
    })
    .await;
    let gw = TestGateway::start(&config(&old.url(), "first-key-123")).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    assert_eq!(get(&client, gw.url("/")).await, (200, "old".into()));

    let slow_client = client.clone();
    let slow_url = gw.url("/slow");
    let slow = tokio::spawn(async move { get(&slow_client, slow_url).await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    gw.write_config(&config(&new.url(), "second-key-456"));
    gw.reload.reload().await.expect("valid config reloads");

    assert_eq!(get(&client, gw.url("/")).await, (200, "new".into()));
    // The new access key is the one that counts now.
    let (status, _) = get(
        &client,
        gw.url("/?wpf_action=test&access_key=second-key-456"),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = get(
        &client,
        gw.url("/?wpf_action=test&access_key=first-key-123"),
    )
    .await;
    assert_eq!(status, 403);
    // The request that was open during the reload finished on the old upstream.
    assert_eq!(slow.await.unwrap(), (200, "old".into()));
    gw.stop().await;
}

#[tokio::test]
async fn an_invalid_config_is_refused_and_the_running_one_stays() {
    let up = TestUpstream::start(|_req| async move {
        hyper::Response::new(http_body_util::Full::new(Bytes::from("up")))
    })
    .await;
    let gw = TestGateway::start(&config(&up.url(), "first-key-123")).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let path = gw.dir.path().join("gateway.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, good.replace("upstream =", "upstream_url =")).unwrap();
    let err = gw
        .reload
        .reload()
        .await
        .expect_err("invalid config must be refused");
    let message = err.to_string();
    assert!(message.contains("gateway.toml:"), "{message}");
    assert!(message.contains("upstream_url"), "{message}");
    assert!(
        !message.contains("first-key-123"),
        "no secret in the error: {message}"
    );
    assert_eq!(get(&client, gw.url("/")).await, (200, "up".into()));
    let (status, _) = get(
        &client,
        gw.url("/?wpf_action=test&access_key=first-key-123"),
    )
    .await;
    assert_eq!(status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn reload_restarts_the_relay_workers_on_the_new_upstream() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let hits_new = Arc::new(AtomicUsize::new(0));
    let h = hits_new.clone();
    let old = TestUpstream::start(|_req| async move {
        hyper::Response::new(http_body_util::Full::new(Bytes::from("old")))
    })
    .await;
    let new = TestUpstream::start(move |req: hyper::Request<hyper::body::Incoming>| {
        let h = h.clone();
        async move {
            if req.headers().contains_key("x-wpf-gateway") {
                h.fetch_add(1, Ordering::SeqCst);
            }
            hyper::Response::new(http_body_util::Full::new(Bytes::from("new")))
        }
    })
    .await;
    let gw = TestGateway::start(&config(&old.url(), "first-key-123")).await;
    gw.write_config(&config(&new.url(), "first-key-123"));
    gw.reload.reload().await.expect("reload");
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let (status, _) = get(
        &client,
        gw.url("/?wpf_action=update&access_key=first-key-123&contact_id=5"),
    )
    .await;
    assert_eq!(status, 202);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while hits_new.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        hits_new.load(Ordering::SeqCst),
        1,
        "relayed to the new upstream"
    );
    gw.stop().await;
}
