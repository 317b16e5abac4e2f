//! The spine works end to end: a request reaches the upstream through the gateway.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::support::{one_site_config, TestGateway, TestUpstream};

#[tokio::test]
async fn get_passes_through_to_upstream() {
    let upstream = TestUpstream::start(|req| async move {
        let body = format!("hello {}", req.uri().path());
        hyper::Response::new(Full::new(Bytes::from(body)))
    })
    .await;
    let gw = TestGateway::start(&one_site_config(&upstream.url())).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let resp = client
        .get(gw.url("/page").parse().unwrap())
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello /page");
    gw.stop().await;
}
