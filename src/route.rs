//! Route stage: `Host` -> site, and the decision webhook or pass-through.

use std::sync::Arc;

use http::Request;

use crate::config::SiteConfig;

/// Host -> site table. Exact names, case-insensitive, port ignored, IPv6 literals with or
/// without brackets, a trailing dot ignored; the first site without hosts is the catch-all.
pub struct Router {
    /// (normalised host, index into `sites`); a handful of entries, scanned without allocating.
    hosts: Vec<(String, usize)>,
    sites: Vec<Arc<SiteConfig>>,
    catch_all: Option<usize>,
}

impl Router {
    pub fn new(sites: &[SiteConfig]) -> Self {
        let sites: Vec<Arc<SiteConfig>> = sites.iter().cloned().map(Arc::new).collect();
        let mut hosts = Vec::new();
        for (i, site) in sites.iter().enumerate() {
            for host in &site.hosts {
                hosts.push((normalise(host).to_ascii_lowercase(), i));
            }
        }
        let catch_all = sites.iter().position(|s| s.hosts.is_empty());
        Router {
            hosts,
            sites,
            catch_all,
        }
    }

    /// Every site, in configuration order (the admin listener lists and looks up these, so it
    /// sees exactly the sites requests are routed to).
    pub fn sites(&self) -> &[Arc<SiteConfig>] {
        &self.sites
    }

    /// The site for a request: its `Host` header, else (HTTP/2 `:authority`, absolute-form)
    /// the URI's authority.
    pub fn route<B>(&self, req: &Request<B>) -> Option<&Arc<SiteConfig>> {
        self.route_index(req).and_then(|i| self.sites.get(i))
    }

    /// Like [`Router::route`], as an index into [`Router::sites`] (for tables kept beside it).
    pub fn route_index<B>(&self, req: &Request<B>) -> Option<usize> {
        let host = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        self.index_for(host)
    }

    /// The site for a host (`Host` header or URI authority), if any.
    pub fn site_for(&self, host: Option<&str>) -> Option<&Arc<SiteConfig>> {
        self.index_for(host).and_then(|i| self.sites.get(i))
    }

    fn index_for(&self, host: Option<&str>) -> Option<usize> {
        if let Some(host) = host.map(normalise) {
            if let Some((_, i)) = self
                .hosts
                .iter()
                .find(|(h, _)| h.eq_ignore_ascii_case(host))
            {
                return Some(*i);
            }
        }
        self.catch_all
    }
}

/// `Example.com:8080` -> `Example.com`, `[::1]:8080` -> `::1`, `example.com.` -> `example.com`,
/// `user@host` -> `host`.
fn normalise(host: &str) -> &str {
    let host = host.trim();
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(ip, _)| ip)
    } else if host.bytes().filter(|&b| b == b':').count() > 1 {
        // Bare IPv6 literal (config), no port possible.
        host
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    host.strip_suffix('.').unwrap_or(host)
}

/// Does the query string carry `wpf_action`? Such requests are webhooks, never forwarded as-is.
/// Every spelling that PHP on the site reads as `wpf_action` counts (`wpf.action`,
/// `wpf%20action`, `wpf_action[]`), so none of them slips past the front door to the site.
pub fn is_webhook(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|pair| {
            let key = pair.split_once('=').map_or(pair, |(k, _)| k);
            php_key_is(key, "wpf_action")
        })
    })
}

/// Is this query key (still encoded) `name` as PHP reads it? PHP decodes `%xx` and `+`, turns
/// `.` and ` ` into `_` and treats `key[...]` as `key`.
pub(crate) fn php_key_is(raw_key: &str, name: &str) -> bool {
    let decoded = form_urlencoded::parse(raw_key.as_bytes())
        .next()
        .map(|(k, _)| k);
    let Some(key) = decoded else { return false };
    let key = key.split('[').next().unwrap_or("");
    key.len() == name.len()
        && key.bytes().zip(name.bytes()).all(|(a, b)| {
            let a = if a == b'.' || a == b' ' { b'_' } else { a };
            a == b
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(name: &str, hosts: &[&str]) -> SiteConfig {
        let text = format!(
            "[server]\nlisten=[\"127.0.0.1:0\"]\n[[site]]\nname=\"{name}\"\nhosts={hosts:?}\nupstream=\"http://127.0.0.1:1\"\naccess_key=\"k-12345678\"\n"
        );
        crate::config::parse(&text, std::path::Path::new("t.toml"))
            .unwrap()
            .sites
            .remove(0)
    }

    #[test]
    fn hosts_match_exactly_case_insensitive_port_ignored() {
        let r = Router::new(&[
            site("a", &["example.com", "[::1]", "2001:db8::2"]),
            site("b", &["other.test"]),
        ]);
        let name = |h: &str| r.site_for(Some(h)).map(|s| s.name.clone());
        assert_eq!(name("Example.COM:8080").as_deref(), Some("a"));
        assert_eq!(name("example.com.").as_deref(), Some("a"));
        assert_eq!(name("[::1]:80").as_deref(), Some("a"));
        assert_eq!(name("[2001:DB8::2]").as_deref(), Some("a"));
        assert_eq!(name("other.test").as_deref(), Some("b"));
        assert_eq!(name("www.example.com"), None);
        assert_eq!(r.site_for(None).map(|s| s.name.clone()), None);
    }

    #[test]
    fn catch_all_takes_unknown_hosts() {
        let r = Router::new(&[site("a", &["example.com"]), site("all", &[])]);
        assert_eq!(r.site_for(Some("nope.test")).unwrap().name, "all");
        assert_eq!(r.site_for(None).unwrap().name, "all");
        assert_eq!(r.site_for(Some("EXAMPLE.com")).unwrap().name, "a");
    }

    #[test]
    fn webhook_detection() {
        assert!(is_webhook(Some("wpf_action=update&access_key=k")));
        assert!(is_webhook(Some("a=1&wpf.action=update")));
        assert!(is_webhook(Some("wpf+action=update")));
        assert!(is_webhook(Some("wpf%5Faction[]=update")));
        assert!(!is_webhook(Some("wpf_actions=update")));
        assert!(!is_webhook(Some("x=wpf_action")));
        assert!(!is_webhook(None));
    }
}
