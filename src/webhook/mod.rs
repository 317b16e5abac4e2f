//! The webhook front door: requests with `wpf_action` in the query.

pub mod parse;

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::config::{Config, SiteConfig};
use crate::server::ConnInfo;
use crate::Body;

/// Authenticates, parses, limits and queues webhooks.
pub struct FrontDoor {}

impl FrontDoor {
    pub fn new(_config: &Config) -> Self {
        FrontDoor {}
    }

    /// Answer one webhook request.
    pub async fn handle(
        &self,
        _site: &Arc<SiteConfig>,
        _req: Request<Incoming>,
        _conn: ConnInfo,
    ) -> Response<Body> {
        crate::proxy::error_page(StatusCode::SERVICE_UNAVAILABLE)
    }
}
