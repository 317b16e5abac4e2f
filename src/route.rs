//! Routing: `Host` header -> site, and the decision webhook or pass-through.

use std::sync::Arc;

use crate::config::SiteConfig;

/// Host -> site table. Exact names, case-insensitive, port ignored; a site without hosts is the
/// catch-all.
pub struct Router {
    sites: Vec<Arc<SiteConfig>>,
}

impl Router {
    pub fn new(sites: &[SiteConfig]) -> Self {
        Router {
            sites: sites.iter().cloned().map(Arc::new).collect(),
        }
    }

    /// The site for a request's host (`Host` header or URI authority), if any.
    pub fn site_for(&self, host: Option<&str>) -> Option<&Arc<SiteConfig>> {
        let host = host.map(strip_port).map(str::to_ascii_lowercase);
        if let Some(host) = &host {
            if let Some(site) = self
                .sites
                .iter()
                .find(|s| s.hosts.iter().any(|h| h == host))
            {
                return Some(site);
            }
        }
        self.sites.iter().find(|s| s.hosts.is_empty())
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: "[::1]:8080"
        return host
            .split(']')
            .next()
            .map_or(host, |h| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// Does the query string carry `wpf_action`? Such requests are webhooks, never forwarded as-is.
pub fn is_webhook(query: Option<&str>) -> bool {
    query.is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "wpf_action"))
}
