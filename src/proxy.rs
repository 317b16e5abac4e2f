//! Pass-through forwarding to the site's upstream.

use std::net::SocketAddr;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use crate::config::{Config, SiteConfig};
use crate::{Body, BoxError};

/// The pooled upstream client.
pub struct Proxy {
    client: Client<HttpConnector, Incoming>,
}

impl Proxy {
    pub fn new(_config: &Config) -> Self {
        Proxy {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Forward one request to the site's upstream and stream the answer back.
    pub async fn forward(
        &self,
        site: &SiteConfig,
        mut req: Request<Incoming>,
        _peer: SocketAddr,
    ) -> Response<Body> {
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let uri = match http::Uri::builder()
            .scheme(site.upstream.scheme.clone())
            .authority(site.upstream.authority.clone())
            .path_and_query(path)
            .build()
        {
            Ok(uri) => uri,
            Err(_) => return error_page(StatusCode::BAD_REQUEST),
        };
        *req.uri_mut() = uri;
        match self.client.request(req).await {
            Ok(resp) => resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()),
            Err(_) => error_page(StatusCode::BAD_GATEWAY),
        }
    }
}

/// A short HTML error page.
pub fn error_page(status: StatusCode) -> Response<Body> {
    let reason = status.canonical_reason().unwrap_or("Error");
    let html = format!(
        "<!doctype html><html><head><title>{code} {reason}</title></head>\
         <body><h1>{code} {reason}</h1><p>wpf-gateway</p></body></html>\n",
        code = status.as_u16()
    );
    let mut resp = Response::new(crate::full_body(html));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}
