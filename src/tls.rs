//! TLS stage: the certificates HTTPS listeners present, chosen by SNI, and their hot reload.
//!
//! ```text
//! [[tls.cert]] files --load_cert--> LoadedCert --CertSet::build--> CertSet (name -> cert)
//!                                                                     ^ swapped whole on reload
//! ClientHello --SniResolver--> CertStore::current() --choose(SNI)--> CertifiedKey
//! ```
//!
//! - **Choice.** Each certificate answers the DNS names of its leaf's subject alternative names.
//!   Exact names first, then wildcards (`*.example.com` matches exactly one label:
//!   `a.example.com`, not `example.com` nor `a.b.example.com`), case-insensitive. No SNI, an
//!   IP address or an unknown name get the default certificate (`default = true`, else the
//!   first). A name in two certificates belongs to the one listed first.
//! - **Reload.** [`CertStore::reload_from`] (SIGHUP, with the reloaded `[tls]`) reads every
//!   certificate again, or, when the `[[tls.cert]]` list changed, loads the new list and
//!   swaps it in whole (a broken file in it keeps the old list whole, and says which file);
//!   [`CertStore::watch_files`] re-reads those of the served list whose files changed. A
//!   re-read replaces each certificate on its own: a broken file keeps that certificate's
//!   previous version (and says which file), the others still update. The set is swapped
//!   behind a lock that is held only to clone an `Arc`, so open connections are untouched and
//!   the next handshake sees the new set.
//! - **Protocol.** TLS 1.3 and 1.2 only (rustls has nothing older), ALPN `h2` then `http/1.1`,
//!   session tickets on; the ring provider, no OpenSSL.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::config::{CertConfig, TlsConfig};

/// How often [`CertStore::watch_files`] looks at the certificate files.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// TLS handshake counters, for metrics.
#[derive(Debug, Default)]
pub struct TlsStats {
    /// Handshakes completed.
    pub handshakes: AtomicU64,
    /// Handshakes that failed: refused by either side, broken off, or not finished within
    /// `server.header_read_timeout`.
    pub handshake_failures: AtomicU64,
}

/// Which of a certificate's two files a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertFile {
    Chain,
    Key,
}

/// A certificate that cannot be used. Every message names the file; none shows key material.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        file: CertFile,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid PEM: {reason}", path.display())]
    Pem {
        file: CertFile,
        path: PathBuf,
        reason: &'static str,
    },
    #[error("{} holds no certificate (expected PEM \"BEGIN CERTIFICATE\" sections, the server's own first)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: the first certificate cannot be parsed: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{} holds no private key (expected PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\"; encrypted keys are not supported)", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: the private key is not usable: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("{}: the private key does not belong to the first certificate in {}", key.display(), chain.display())]
    KeyMismatch { chain: PathBuf, key: PathBuf },
}

impl CertError {
    /// The file the problem is in (for a mismatch: the key, the file usually replaced last).
    pub fn file(&self) -> CertFile {
        match self {
            CertError::Read { file, .. } | CertError::Pem { file, .. } => *file,
            CertError::NoCertificate { .. } | CertError::BadCertificate { .. } => CertFile::Chain,
            CertError::NoKey { .. } | CertError::BadKey { .. } | CertError::KeyMismatch { .. } => {
                CertFile::Key
            }
        }
    }
}

/// Certificates that failed to reload; each kept its previous version.
#[derive(Debug, thiserror::Error)]
pub struct ReloadError {
    pub failures: Vec<CertError>,
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.failures.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A certificate chain with its key, ready for rustls, and the names it answers.
#[derive(Clone)]
pub struct LoadedCert {
    pub certified: Arc<CertifiedKey>,
    /// Lower-cased DNS names of the leaf's subject alternative names, wildcards as written
    /// (`*.example.com`).
    pub names: Vec<String>,
}

impl fmt::Debug for LoadedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedCert")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

fn pem_reason(e: &pem::Error) -> &'static str {
    // Never the error's own text: it may quote bytes of the file, and this may be a key.
    match e {
        pem::Error::MissingSectionEnd { .. } => "a section has no END line",
        pem::Error::IllegalSectionStart { .. } => "a BEGIN line is malformed",
        pem::Error::Base64Decode(_) => "a section is not valid base64",
        pem::Error::SectionTooLarge => "a section is too large",
        _ => "unreadable",
    }
}

/// Read a PEM chain (leaf first) and its PEM private key, and check that they belong together.
pub fn load_cert(chain_path: &Path, key_path: &Path) -> Result<LoadedCert, CertError> {
    // Two small files: reading them inline is cheaper than a trip to a blocking thread.
    let read = |file, path: &Path| {
        std::fs::read(path).map_err(|source| CertError::Read {
            file,
            path: path.to_owned(),
            source,
        })
    };
    let chain_pem = read(CertFile::Chain, chain_path)?;
    let key_pem = read(CertFile::Key, key_path)?;

    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Pem {
            file: CertFile::Chain,
            path: chain_path.to_owned(),
            reason: pem_reason(&e),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate {
            path: chain_path.to_owned(),
        });
    };
    let names = {
        let parsed =
            webpki::EndEntityCert::try_from(leaf).map_err(|e| CertError::BadCertificate {
                path: chain_path.to_owned(),
                reason: e.to_string(),
            })?;
        parsed
            .valid_dns_names()
            .map(|name| name.trim_end_matches('.').to_ascii_lowercase())
            .collect()
    };

    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => {
            return Err(CertError::NoKey {
                path: key_path.to_owned(),
            })
        }
        Err(e) => {
            return Err(CertError::Pem {
                file: CertFile::Key,
                path: key_path.to_owned(),
                reason: pem_reason(&e),
            })
        }
    };
    let signing_key =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| CertError::BadKey {
            path: key_path.to_owned(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // `Unknown`: the key type cannot tell its public half; the handshake will.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(CertError::KeyMismatch {
                chain: chain_path.to_owned(),
                key: key_path.to_owned(),
            })
        }
        Err(e) => {
            return Err(CertError::BadCertificate {
                path: chain_path.to_owned(),
                reason: e.to_string(),
            })
        }
    }
    Ok(LoadedCert {
        certified: Arc::new(certified),
        names,
    })
}

/// The certificates as one handshake sees them: immutable, swapped whole.
struct CertSet {
    certs: Vec<Arc<CertifiedKey>>,
    exact: HashMap<String, usize>,
    /// `*.example.com` is stored under `example.com`.
    wildcard: HashMap<String, usize>,
    default: usize,
}

impl CertSet {
    /// `certs` is not empty; `default` is one of its indices.
    fn build(certs: &[LoadedCert], default: usize) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (i, cert) in certs.iter().enumerate() {
            for name in &cert.names {
                // First listed wins: `or_insert` keeps an earlier certificate's claim.
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()).or_insert(i),
                    None => exact.entry(name.clone()).or_insert(i),
                };
            }
        }
        CertSet {
            certs: certs.iter().map(|c| c.certified.clone()).collect(),
            exact,
            wildcard,
            default: default.min(certs.len().saturating_sub(1)),
        }
    }

    /// Index of the certificate for this SNI.
    fn choose(&self, server_name: Option<&str>) -> usize {
        let Some(name) = server_name else {
            return self.default;
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(&i) = self.exact.get(&name) {
            return i;
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .copied()
            .unwrap_or(self.default)
    }
}

/// What a file looked like when it was last read: a renewal (rewrite in place, rename over
/// it, or a symlink switched to a new target) changes at least one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
    device: u64,
}

impl Fingerprint {
    /// `None` when the file cannot be looked at (removed mid-renewal, say).
    fn of(path: &Path) -> Option<Fingerprint> {
        use std::os::unix::fs::MetadataExt;
        // `metadata` follows symlinks: a switched link shows its new target.
        let m = std::fs::metadata(path).ok()?;
        Some(Fingerprint {
            len: m.len(),
            modified: m.modified().ok(),
            inode: m.ino(),
            device: m.dev(),
        })
    }
}

/// One configured certificate: where it comes from and what is served now.
struct Slot {
    source: CertConfig,
    /// Chain and key files as they were when last read (successfully or not).
    seen: [Option<Fingerprint>; 2],
    current: LoadedCert,
}

impl Slot {
    /// Read a configured certificate, noting what its files looked like just before.
    fn load(source: &CertConfig) -> Result<Slot, CertError> {
        // Looked at before reading: a write that lands after this is seen by the next look.
        let seen = [Fingerprint::of(&source.chain), Fingerprint::of(&source.key)];
        let current = load_cert(&source.chain, &source.key)?;
        Ok(Slot {
            source: source.clone(),
            seen,
            current,
        })
    }

    fn fingerprints(&self) -> [Option<Fingerprint>; 2] {
        [
            Fingerprint::of(&self.source.chain),
            Fingerprint::of(&self.source.key),
        ]
    }
}

/// The configured certificates, in `[[tls.cert]]` order, and which one is the default: a
/// reload with a changed list replaces both together.
struct Slots {
    list: Vec<Slot>,
    default: usize,
}

impl Slots {
    /// The set a handshake sees: built from what every slot serves now.
    fn cert_set(&self) -> Arc<CertSet> {
        let loaded: Vec<LoadedCert> = self.list.iter().map(|s| s.current.clone()).collect();
        Arc::new(CertSet::build(&loaded, self.default))
    }
}

/// The index of the `default = true` certificate, else the first.
fn default_of(config: &TlsConfig) -> usize {
    config.certs.iter().position(|c| c.default).unwrap_or(0)
}

/// The same file names and the same default flag (`CertConfig` has no `PartialEq`).
fn same_sources(slots: &Slots, config: &TlsConfig) -> bool {
    slots.list.len() == config.certs.len()
        && slots.list.iter().zip(&config.certs).all(|(slot, c)| {
            slot.source.chain == c.chain
                && slot.source.key == c.key
                && slot.source.default == c.default
        })
}

/// The certificates of the HTTPS listeners, reloadable while serving.
pub struct CertStore {
    /// Reloads are serialized here (SIGHUP and the file watch may meet), and the watch reads
    /// the files of whatever list is here, so a new list is watched from its swap on.
    slots: Mutex<Slots>,
    current: RwLock<Arc<CertSet>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore").finish_non_exhaustive()
    }
}

impl CertStore {
    /// Load every `[[tls.cert]]`; the first that cannot be used is the error.
    pub fn load(config: &TlsConfig) -> Result<Arc<CertStore>, LoadError> {
        let list = config
            .certs
            .iter()
            .map(Slot::load)
            .collect::<Result<Vec<_>, _>>()?;
        if list.is_empty() {
            return Err(LoadError::NoCertificates);
        }
        let slots = Slots {
            list,
            default: default_of(config),
        };
        Ok(Arc::new(CertStore {
            current: RwLock::new(slots.cert_set()),
            slots: Mutex::new(slots),
        }))
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        // A panic mid-reload leaves every slot whole: each is assigned in one move.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Make `set` the one new handshakes get.
    fn publish(&self, set: Arc<CertSet>) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = set;
    }

    fn current(&self) -> Arc<CertSet> {
        // Poisoning cannot leave a half-written set: the writer only assigns an `Arc`.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The certificate a handshake with this SNI gets now.
    pub fn certificate_for(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        let set = self.current();
        set.certs[set.choose(server_name)].clone()
    }

    /// Read every certificate again. Certificates that fail keep their previous version; each
    /// failure is logged naming its file, and returned.
    pub fn reload(&self) -> Result<(), ReloadError> {
        self.reload_where(&mut self.lock_slots(), |_, _| true)
    }

    /// Serve the certificates `config` lists (SIGHUP, with the reloaded configuration).
    ///
    /// - **Same list** (files and default as now): every certificate is read again, as
    ///   [`CertStore::reload`] does.
    /// - **Changed list** (a certificate added or removed, other files, another default):
    ///   every listed certificate is read, and the new set replaces the old one whole for new
    ///   handshakes; open connections keep theirs. If any of them cannot be used, the old list
    ///   stays, served and watched as before, and every failure is logged naming its file, and
    ///   returned. All or nothing, because a half-new list could hand a name to the wrong
    ///   certificate or lose the default.
    /// - **Empty list**: only when `[tls]` was removed, which needs a restart (the listeners
    ///   stay until then); they keep their certificates, read again like the same list.
    pub fn reload_from(&self, config: &TlsConfig) -> Result<(), ReloadError> {
        let mut slots = self.lock_slots();
        if config.certs.is_empty() || same_sources(&slots, config) {
            return self.reload_where(&mut slots, |_, _| true);
        }
        let mut list = Vec::with_capacity(config.certs.len());
        let mut failures = Vec::new();
        for source in &config.certs {
            match Slot::load(source) {
                Ok(slot) => list.push(slot),
                Err(e) => {
                    tracing::error!(
                        file = %error_path(&e, source).display(),
                        error = %e,
                        "new certificate list not loaded; keeping the previous certificates"
                    );
                    failures.push(e);
                }
            }
        }
        if !failures.is_empty() {
            return Err(ReloadError { failures });
        }
        for slot in &list {
            tracing::info!(
                chain = %slot.source.chain.display(),
                names = ?slot.current.names,
                "certificate loaded"
            );
        }
        *slots = Slots {
            list,
            default: default_of(config),
        };
        self.publish(slots.cert_set());
        tracing::info!(certs = slots.list.len(), "certificate list replaced");
        Ok(())
    }

    /// Read again the certificates whose chain or key file changed since it was last read;
    /// `Ok(false)` when none did.
    pub fn reload_changed(&self) -> Result<bool, ReloadError> {
        let mut any = false;
        self.reload_where(&mut self.lock_slots(), |seen, now| {
            let changed = seen != now;
            any |= changed;
            changed
        })?;
        Ok(any)
    }

    /// Read again the certificates `select` picks by their files' fingerprints (as last read,
    /// as now); `slots` is the locked list.
    fn reload_where(
        &self,
        slots: &mut Slots,
        mut select: impl FnMut(&[Option<Fingerprint>; 2], &[Option<Fingerprint>; 2]) -> bool,
    ) -> Result<(), ReloadError> {
        let mut failures = Vec::new();
        let mut replaced = false;
        for slot in slots.list.iter_mut() {
            // Looked at before reading: a write that lands after this is seen next time.
            let now = slot.fingerprints();
            if !select(&slot.seen, &now) {
                continue;
            }
            slot.seen = now;
            match load_cert(&slot.source.chain, &slot.source.key) {
                Ok(loaded) => {
                    tracing::info!(
                        chain = %slot.source.chain.display(),
                        names = ?loaded.names,
                        "certificate loaded"
                    );
                    slot.current = loaded;
                    replaced = true;
                }
                Err(e) => {
                    tracing::error!(
                        file = %error_path(&e, &slot.source).display(),
                        error = %e,
                        "certificate not reloaded; keeping the previous one"
                    );
                    failures.push(e);
                }
            }
        }
        if replaced {
            self.publish(slots.cert_set());
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(ReloadError { failures })
        }
    }

    /// Reload certificates whose files changed, every [`WATCH_INTERVAL`], until `stop`.
    ///
    /// Polling rather than inotify: two `stat` calls per certificate every 2 s cost nothing,
    /// need no extra crate, work on every file system (NFS, overlay, bind mounts), and see
    /// the rename-over and symlink switches renewal tools do, which an inotify watch on the
    /// old file misses. A renewal shows up within 2 s.
    pub async fn watch_files(self: Arc<Self>, stop: CancellationToken) {
        // The first look is one interval after loading, not at once.
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + WATCH_INTERVAL, WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Failures were logged by the reload and keep the old certificate; the next
            // change to the file tries again.
            let _ = self.reload_changed();
        }
    }

    /// The rustls server configuration: this store's certificates by SNI, TLS 1.3 and 1.2,
    /// ALPN `h2` and `http/1.1`, session tickets.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SniResolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // Resumption without a server-side cache entry per client; keys rotate every 6 h.
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
        Ok(Arc::new(config))
    }
}

fn error_path<'a>(e: &CertError, source: &'a CertConfig) -> &'a Path {
    match e.file() {
        CertFile::Chain => &source.chain,
        CertFile::Key => &source.key,
    }
}

/// Why the HTTPS certificates could not be loaded at start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Cert(#[from] CertError),
    #[error("HTTPS listeners but no [[tls.cert]]")]
    NoCertificates,
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Picks the certificate for each handshake from the store's current set.
struct SniResolver(Arc<CertStore>);

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SniResolver").field(&self.0).finish()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.certificate_for(client_hello.server_name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            Files {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        /// A self-signed certificate for `names` written as `NAME.pem` / `NAME.key`.
        fn cert(&self, file: &str, names: &[&str]) -> CertConfig {
            let key = rcgen::KeyPair::generate().unwrap();
            let params = rcgen::CertificateParams::new(
                names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            )
            .unwrap();
            let cert = params.self_signed(&key).unwrap();
            let chain = self.dir.path().join(format!("{file}.pem"));
            let key_path = self.dir.path().join(format!("{file}.key"));
            std::fs::write(&chain, cert.pem()).unwrap();
            std::fs::write(&key_path, key.serialize_pem()).unwrap();
            CertConfig {
                chain,
                key: key_path,
                default: false,
            }
        }
    }

    fn names_of(store: &CertStore, sni: Option<&str>) -> Vec<String> {
        let chosen = store.certificate_for(sni);
        let slots = store.slots.lock().unwrap();
        let slot = slots
            .list
            .iter()
            .find(|s| Arc::ptr_eq(&s.current.certified, &chosen))
            .unwrap();
        slot.current.names.clone()
    }

    #[test]
    fn sni_exact_then_one_label_wildcard_then_default() {
        let files = Files::new();
        let a = files.cert("a", &["a.test", "www.a.test"]);
        let b = files.cert("b", &["*.b.test", "B.test"]);
        let mut d = files.cert("d", &["default.test"]);
        d.default = true;
        let store = CertStore::load(&TlsConfig {
            listen: Vec::new(),
            certs: vec![a, b, d],
        })
        .unwrap();
        let a_names = vec!["a.test".to_string(), "www.a.test".into()];
        let b_names = vec!["*.b.test".to_string(), "b.test".into()];
        let d_names = vec!["default.test".to_string()];
        assert_eq!(names_of(&store, Some("a.test")), a_names);
        assert_eq!(names_of(&store, Some("WWW.A.Test.")), a_names);
        assert_eq!(names_of(&store, Some("x.b.test")), b_names);
        assert_eq!(names_of(&store, Some("b.test")), b_names);
        assert_eq!(names_of(&store, Some("y.x.b.test")), d_names);
        assert_eq!(names_of(&store, Some("other.test")), d_names);
        assert_eq!(names_of(&store, None), d_names);
    }

    #[test]
    fn first_listed_is_default_and_wins_a_shared_name() {
        let files = Files::new();
        let a = files.cert("a", &["shared.test", "a.test"]);
        let b = files.cert("b", &["shared.test", "b.test"]);
        let store = CertStore::load(&TlsConfig {
            listen: Vec::new(),
            certs: vec![a, b],
        })
        .unwrap();
        assert_eq!(names_of(&store, Some("shared.test"))[1], "a.test");
        assert_eq!(names_of(&store, Some("b.test"))[1], "b.test");
        assert_eq!(names_of(&store, None)[1], "a.test");
    }

    #[test]
    fn load_errors_name_the_file_and_never_the_key() {
        let files = Files::new();
        let a = files.cert("a", &["a.test"]);
        let b = files.cert("b", &["b.test"]);
        let missing = files.dir.path().join("missing.pem");
        let e = load_cert(&missing, &a.key).unwrap_err();
        assert_eq!(e.file(), CertFile::Chain);
        assert!(e
            .to_string()
            .starts_with(&format!("cannot read {}", missing.display())));

        let e = load_cert(&a.chain, &b.key).unwrap_err();
        assert!(matches!(e, CertError::KeyMismatch { .. }), "{e}");
        assert_eq!(e.file(), CertFile::Key);

        let e = load_cert(&a.key, &a.key).unwrap_err();
        assert!(matches!(e, CertError::NoCertificate { .. }), "{e}");
        let e = load_cert(&a.chain, &a.chain).unwrap_err();
        assert!(matches!(e, CertError::NoKey { .. }), "{e}");

        let key_text = std::fs::read_to_string(&a.key).unwrap();
        let broken = key_text.replace("-----END PRIVATE KEY-----", "");
        let broken_path = files.dir.path().join("broken.key");
        std::fs::write(&broken_path, &broken).unwrap();
        let e = load_cert(&a.chain, &broken_path).unwrap_err();
        assert_eq!(e.file(), CertFile::Key);
        let body: String = key_text.lines().nth(1).unwrap().chars().take(16).collect();
        assert!(!e.to_string().contains(&body), "{e}");
    }

    #[test]
    fn a_failed_reload_keeps_that_certificate_and_updates_the_others() {
        let files = Files::new();
        let a = files.cert("a", &["a.test"]);
        let b = files.cert("b", &["b.test"]);
        let store = CertStore::load(&TlsConfig {
            listen: Vec::new(),
            certs: vec![a.clone(), b],
        })
        .unwrap();
        assert!(!store.reload_changed().unwrap(), "nothing changed yet");
        std::fs::write(&a.chain, "garbage").unwrap();
        files.cert("b", &["b.test", "new.b.test"]);
        let err = store.reload_changed().unwrap_err();
        assert_eq!(err.failures.len(), 1);
        assert!(
            err.to_string().contains(&a.chain.display().to_string()),
            "{err}"
        );
        assert_eq!(names_of(&store, Some("a.test")), ["a.test"]);
        assert_eq!(
            names_of(&store, Some("new.b.test")),
            ["b.test", "new.b.test"]
        );
        // Reported once: the broken file is not retried until it changes again.
        assert!(!store.reload_changed().unwrap());
    }

    fn tls(certs: &[&CertConfig]) -> TlsConfig {
        TlsConfig {
            listen: Vec::new(),
            certs: certs.iter().map(|c| (*c).clone()).collect(),
        }
    }

    #[test]
    fn a_new_list_replaces_the_set_whole_and_the_watch_follows_it() {
        let files = Files::new();
        let a = files.cert("a", &["a.test"]);
        let b = files.cert("b", &["b.test"]);
        let store = CertStore::load(&tls(&[&a])).unwrap();

        // Added, and made the default.
        let mut b_default = b.clone();
        b_default.default = true;
        store.reload_from(&tls(&[&a, &b_default])).unwrap();
        assert_eq!(names_of(&store, Some("b.test")), ["b.test"]);
        assert_eq!(names_of(&store, Some("a.test")), ["a.test"]);
        assert_eq!(names_of(&store, None), ["b.test"]);

        // Removed: its name falls back to the default.
        store.reload_from(&tls(&[&b])).unwrap();
        assert_eq!(names_of(&store, Some("a.test")), ["b.test"]);

        // The watch reads the files of the new list, not those of the old one.
        files.cert("a", &["a.test", "new.a.test"]);
        assert!(!store.reload_changed().unwrap(), "a is not served any more");
        files.cert("b", &["b.test", "new.b.test"]);
        assert!(store.reload_changed().unwrap());
        assert_eq!(
            names_of(&store, Some("new.b.test")),
            ["b.test", "new.b.test"]
        );
    }

    #[test]
    fn a_new_list_with_a_broken_file_keeps_the_old_list_whole() {
        let files = Files::new();
        let a = files.cert("a", &["a.test"]);
        let b = files.cert("b", &["b.test"]);
        let c = files.cert("c", &["c.test"]);
        let store = CertStore::load(&tls(&[&a])).unwrap();
        std::fs::write(&c.key, "garbage").unwrap();
        let err = store.reload_from(&tls(&[&b, &c])).unwrap_err();
        assert_eq!(err.failures.len(), 1);
        assert!(
            err.to_string().contains(&c.key.display().to_string()),
            "{err}"
        );
        // Nothing of the new list is served, and the old list is still the one watched.
        assert_eq!(names_of(&store, Some("b.test")), ["a.test"]);
        files.cert("a", &["a.test", "www.a.test"]);
        assert!(store.reload_changed().unwrap());
        assert_eq!(
            names_of(&store, Some("www.a.test")),
            ["a.test", "www.a.test"]
        );
    }
}
