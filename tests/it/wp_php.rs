//! Real WordPress for the read-back tests: Debian's `wordpress` package (6.1) run by `php-cli`
//! on a database of the test MariaDB, installed with WordPress's own `wp_install()`. Each
//! question is one `php` run of a small script that loads WordPress (`wp-settings.php`, with
//! our constants instead of Debian's `wp-config.php`) and answers in JSON, so what the tests
//! check is what WordPress itself reads.
//!
//! WordPress makes no request off this machine: the site's URL is on loopback and
//! `WP_HTTP_BLOCK_EXTERNAL` refuses every other host; cron never spawns.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::mariadb::MariaDb;

/// Where Debian's package puts WordPress.
pub const WORDPRESS: &str = "/usr/share/wordpress";

/// One installed WordPress site.
pub struct WordPressSite {
    /// The database, as the gateway's `[site.store] url`.
    pub url: String,
    pub dir: tempfile::TempDir,
    script: PathBuf,
}

/// The bootstrap script (`wp.php`): `%NAME%` placeholders filled in by [`WordPressSite::install`]
/// and by `bench/wordpress.sh`.
pub const SCRIPT: &str = include_str!("wp.php");

/// Whether WordPress and PHP are installed; a message, and under CI a failure, when not.
pub fn available() -> bool {
    let present = Path::new(WORDPRESS).join("wp-settings.php").is_file()
        && Command::new("php")
            .arg("-r")
            .arg("exit(function_exists('mysqli_connect') ? 0 : 1);")
            .status()
            .is_ok_and(|s| s.success());
    if !present {
        assert!(
            std::env::var_os("CI").is_none(),
            "WordPress or php-cli/php-mysql is not installed, but CI must run the read-back tests"
        );
        eprintln!(
            "SKIPPED: WordPress read-back (apt-get install wordpress php-cli php-mysql to run it)"
        );
    }
    present
}

impl WordPressSite {
    /// A fresh database with WordPress installed in it (`wp_install`), WP Fusion's meta keys
    /// under `slug`. `home` is the site's URL (loopback), `constants` more `define`s.
    pub async fn install(
        server: &MariaDb,
        slug: &str,
        home: &str,
        constants: &[(&str, &str)],
    ) -> Self {
        let db = server.database().await;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("mu-plugins")).expect("mu-plugins");
        let constants = format!(
            "array( {} )",
            constants
                .iter()
                .map(|(k, v)| format!("'{k}' => '{v}'"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let script = dir.path().join("wp.php");
        let text = SCRIPT
            .replace("%DB%", &db)
            .replace("%PORT%", &server.port.to_string())
            .replace("%HOME%", home)
            .replace("%DIR%", &dir.path().display().to_string())
            .replace("%WORDPRESS%", WORDPRESS)
            .replace("%SLUG%", slug)
            .replace("%CONSTANTS%", &constants);
        std::fs::write(&script, text).expect("write wp.php");
        let site = WordPressSite {
            url: server.url(&db),
            dir,
            script,
        };
        let installed = site.php(&["install"]).await;
        assert_eq!(installed["user_id"], 1, "wp_install made the admin");
        site
    }

    /// The bootstrap script (also a router for `php -S`).
    pub fn script(&self) -> &Path {
        &self.script
    }

    /// Run `wp.php ARGS` and read its JSON answer (bounded: 60 s).
    pub async fn php(&self, args: &[&str]) -> Value {
        let mut cmd = tokio::process::Command::new("php");
        cmd.arg("-d")
            .arg("display_errors=stderr")
            .arg(&self.script)
            .args(args)
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .expect("php answers within 60 s")
            .expect("run php");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "php {args:?} failed: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("php {args:?}: {e}: {stdout}"))
    }
}

/// `php -S` serving the site (WordPress through `wp.php` as the router) until dropped.
pub struct PhpServer {
    child: tokio::process::Child,
}

impl WordPressSite {
    /// Put a mu-plugin in the site (`name` in `mu-plugins/`).
    pub fn mu_plugin(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join("mu-plugins").join(name), text).expect("mu-plugin");
    }

    /// Serve the site on `127.0.0.1:port`; returns once it takes connections (within 10 s).
    pub async fn serve(&self, port: u16) -> PhpServer {
        let child = tokio::process::Command::new("php")
            .arg("-d")
            .arg("display_errors=stderr")
            .arg("-S")
            .arg(format!("127.0.0.1:{port}"))
            .arg(&self.script)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("php -S");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(std::time::Instant::now() < deadline, "php -S did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        PhpServer { child }
    }
}

impl PhpServer {
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
