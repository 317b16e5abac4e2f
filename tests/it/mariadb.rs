//! A real MariaDB server for the WordPress store tests: Debian's `mariadb-server` binaries,
//! started by the tests themselves in a temporary data directory, on a private TCP port and
//! socket, never a system service. One server for the whole `cargo test` process; each test
//! gets a database of its own.
//!
//! The server runs under a small shell that holds the read end of a pipe whose write end this
//! process keeps: when the test process ends (however it ends), the pipe closes, and the shell
//! stops the server and removes its directory.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::Connection;

/// The running server.
pub struct MariaDb {
    pub port: u16,
    pub dir: PathBuf,
    /// The CA (PEM file) that signed the server's TLS certificate (for `127.0.0.1`).
    pub ca: PathBuf,
    /// Closing it (process exit) stops the server.
    _keepalive: std::process::ChildStdin,
}

static SERVER: OnceLock<Result<MariaDb, String>> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

/// WordPress 6.1's `users` and `usermeta` tables (`wp-admin/includes/schema.php`), with the
/// charset and collation WordPress picks on MariaDB 10.x.
pub const WP_USER_TABLES: &str = "
CREATE TABLE {p}users (
  ID bigint(20) unsigned NOT NULL auto_increment,
  user_login varchar(60) NOT NULL default '',
  user_pass varchar(255) NOT NULL default '',
  user_nicename varchar(50) NOT NULL default '',
  user_email varchar(100) NOT NULL default '',
  user_url varchar(100) NOT NULL default '',
  user_registered datetime NOT NULL default '0000-00-00 00:00:00',
  user_activation_key varchar(255) NOT NULL default '',
  user_status int(11) NOT NULL default '0',
  display_name varchar(250) NOT NULL default '',
  PRIMARY KEY  (ID),
  KEY user_login_key (user_login),
  KEY user_nicename (user_nicename),
  KEY user_email (user_email)
) DEFAULT CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_520_ci;
CREATE TABLE {p}usermeta (
  umeta_id bigint(20) unsigned NOT NULL auto_increment,
  user_id bigint(20) unsigned NOT NULL default '0',
  meta_key varchar(255) default NULL,
  meta_value longtext,
  PRIMARY KEY  (umeta_id),
  KEY user_id (user_id),
  KEY meta_key (meta_key(191))
) DEFAULT CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_520_ci;
";

fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The shared server, started on first use. `None` (with a message on stderr) when MariaDB is
/// not installed on this machine; under CI (`CI` set) that is a failure, as `.ci/run`
/// installs it.
pub fn server() -> Option<&'static MariaDb> {
    let result = SERVER.get_or_init(start);
    match result {
        Ok(server) => Some(server),
        Err(why) if why.starts_with("absent:") => {
            assert!(
                std::env::var_os("CI").is_none(),
                "MariaDB is not installed, but CI must run the WordPress store tests: {why}"
            );
            eprintln!(
                "SKIPPED: {why} (apt-get install mariadb-server to run the WordPress store tests)"
            );
            None
        }
        Err(why) => panic!("cannot start MariaDB: {why}"),
    }
}

fn start() -> Result<MariaDb, String> {
    let (Some(mariadbd), Some(install_db)) =
        (find_binary("mariadbd"), find_binary("mariadb-install-db"))
    else {
        return Err("absent: mariadbd or mariadb-install-db is not on this machine".into());
    };
    let dir = tempfile::Builder::new()
        .prefix("wpfgw-mariadb-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    let data = dir.join("data");
    let user = String::from_utf8_lossy(
        &Command::new("id")
            .arg("-un")
            .output()
            .map_err(|e| format!("id -un: {e}"))?
            .stdout,
    )
    .trim()
    .to_owned();
    let out = Command::new(&install_db)
        .arg("--no-defaults")
        .arg(format!("--datadir={}", data.display()))
        .arg(format!("--user={user}"))
        .arg("--auth-root-authentication-method=normal")
        .arg("--skip-test-db")
        .output()
        .map_err(|e| format!("{}: {e}", install_db.display()))?;
    if !out.status.success() {
        return Err(format!(
            "mariadb-install-db failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let ca = write_certificates(&dir)?;
    let port = free_port();
    let socket = dir.join("mysqld.sock");
    let server_cmd = format!(
        "{bin} --no-defaults --datadir={data} --socket={socket} --port={port} \
         --bind-address=127.0.0.1 --user={user} --skip-grant-tables --skip-log-bin \
         --pid-file={dir}/mysqld.pid --log-error={dir}/error.log \
         --innodb-buffer-pool-size=64M --innodb-flush-log-at-trx-commit=2 --max-connections=200 \
         --ssl-ca={dir}/ca.pem --ssl-cert={dir}/server.pem --ssl-key={dir}/server.key",
        bin = mariadbd.display(),
        data = data.display(),
        socket = socket.display(),
        dir = dir.display(),
    );
    // `read` returns when this process's end of the pipe closes: then stop and clean up.
    let script = format!(
        "{server_cmd} & pid=$!; read -r _ || true; kill $pid 2>/dev/null; wait $pid; rm -rf {}",
        dir.display()
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("sh: {e}"))?;
    let stdin = child.stdin.take().ok_or("no stdin pipe")?;
    // Bounded wait for the server to take connections: its log says so (a connection alone
    // could reach another program's listener), and the port answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
        if log.contains("ready for connections")
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        {
            break;
        }
        if log.contains("Can't start server") || Instant::now() > deadline {
            return Err(format!("MariaDB did not start within 60 s:\n{log}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(MariaDb {
        port,
        dir,
        ca,
        _keepalive: stdin,
    })
}

/// A test CA and a server certificate for `127.0.0.1` signed by it, written to `dir` as
/// `ca.pem`, `server.pem` and `server.key` (made with rcgen, like the gateway's TLS tests):
/// TLS to the database is optional (`?ssl-mode=…`), so the server offers it. The CA's path.
pub fn write_certificates(dir: &std::path::Path) -> Result<PathBuf, String> {
    let err = |e: rcgen::Error| format!("test certificate: {e}");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "wpf-gateway MariaDB test CA");
    let ca_key = rcgen::KeyPair::generate().map_err(err)?;
    let ca = params.self_signed(&ca_key).map_err(err)?;
    let issuer = rcgen::Issuer::new(params, ca_key);
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .map_err(err)?
        .signed_by(&key, &issuer)
        .map_err(err)?;
    let write = |name: &str, text: String| {
        std::fs::write(dir.join(name), text).map_err(|e| format!("{name}: {e}"))
    };
    write("ca.pem", ca.pem())?;
    write("server.pem", leaf.pem())?;
    write("server.key", key.serialize_pem())?;
    Ok(dir.join("ca.pem"))
}

/// A free port below the ephemeral range (32768 and up on Linux), so that no client socket
/// or `bind(…:0)` of the tests running alongside can take it before the server binds it.
fn free_port() -> u16 {
    (0..1000)
        .map(|_| rand::random_range(20_000..32_000))
        .find(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .expect("a free port in 20000..32000")
}

impl MariaDb {
    /// `mysql://root@127.0.0.1:PORT/DB` (the server skips grant tables: no password).
    pub fn url(&self, db: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{db}", self.port)
    }

    /// A new empty database, its name.
    pub async fn database(&self) -> String {
        let name = format!(
            "wpt_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::SeqCst)
        );
        let mut conn = sqlx::MySqlConnection::connect(&self.url(""))
            .await
            .expect("connect to MariaDB");
        sqlx::raw_sql(&format!(
            "CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_520_ci"
        ))
        .execute(&mut conn)
        .await
        .expect("create database");
        conn.close().await.ok();
        name
    }

    /// A new database with WordPress's user tables under `prefix`: its URL.
    pub async fn wordpress_tables(&self, prefix: &str) -> String {
        let db = self.database().await;
        let url = self.url(&db);
        let mut conn = sqlx::MySqlConnection::connect(&url).await.expect("connect");
        sqlx::raw_sql(&WP_USER_TABLES.replace("{p}", prefix))
            .execute(&mut conn)
            .await
            .expect("create tables");
        conn.close().await.ok();
        url
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("mysqld.sock")
    }
}
