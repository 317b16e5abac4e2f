//! Telling the site that direct mode changed a user (`[site.store] notify = true`): one
//! authenticated request to the companion mu-plugin `contrib/wordpress/wpf-gateway.php` on the
//! site's upstream, which clears WordPress's user cache (`clean_user_cache`, for sites with a
//! persistent object cache) and fires WP Fusion's `wpf_tags_modified`, so membership and
//! course plugins react as if WP Fusion had loaded the tags itself.
//!
//! ```text
//! POST {upstream}/?wpf_gateway=user_changed
//! Host: the site's first host   X-WPF-Gateway-Key: the site's access key
//! {"user_id":7,"contact_id":"41","tags":["VIP"]}
//! → 200 {"ok":true,...}
//! ```
//!
//! The user change is committed before the call: a failed notify fails the job transiently,
//! and its retry (which finds the user already up to date) notifies again. Nothing is lost.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::SiteConfig;
use crate::proxy::{upstream_connector, Connector};
use crate::store::User;

/// The header that carries the site's access key (the mu-plugin compares it in constant time).
pub const KEY_HEADER: &str = "x-wpf-gateway-key";
/// How much of the answer is read.
const ANSWER_LIMIT: usize = 16 * 1024;

/// Calls one site's mu-plugin endpoint.
pub struct Notifier {
    client: Client<Connector, Full<Bytes>>,
    target: String,
    host: String,
    key: String,
    timeout: Duration,
}

impl Notifier {
    pub fn new(site: &SiteConfig) -> Result<Self, rustls::Error> {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(upstream_connector(site.upstream_connect_timeout)?);
        Ok(Notifier {
            client,
            target: format!(
                "{}://{}/?wpf_gateway=user_changed",
                site.upstream.scheme, site.upstream.authority
            ),
            host: site
                .hosts
                .first()
                .cloned()
                .unwrap_or_else(|| site.upstream.authority.to_string()),
            key: site.access_key.expose().to_owned(),
            timeout: site.upstream_timeout,
        })
    }

    /// Tell the site that `user` changed. The error says why, never the key.
    pub async fn user_changed(&self, user: &User) -> Result<(), String> {
        let body = serde_json::json!({
            "user_id": user.id,
            "contact_id": user.contact_id,
            "tags": user.tags,
        })
        .to_string();
        let request = Request::builder()
            .method(Method::POST)
            .uri(&self.target)
            .header(HOST, &self.host)
            .header(CONTENT_TYPE, "application/json")
            .header(KEY_HEADER, &self.key)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("cannot build the notify request: {e}"))?;
        let exchange = async {
            let answer = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("the site is unreachable: {e}"))?;
            let status = answer.status();
            let body = Limited::new(answer.into_body(), ANSWER_LIMIT)
                .collect()
                .await
                .map_err(|e| format!("the site's answer broke off: {e}"))?
                .to_bytes();
            let ok = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .is_some_and(|v| v["ok"] == true);
            if status.is_success() && ok {
                Ok(())
            } else {
                // Without the mu-plugin WordPress answers its front page: say so.
                Err(format!(
                    "the site answered {status} without {{\"ok\":true}} (is \
                     contrib/wordpress/wpf-gateway.php installed as a mu-plugin?)"
                ))
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| format!("the site did not answer within {:?}", self.timeout))?
    }
}
