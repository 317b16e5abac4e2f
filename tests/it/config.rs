//! Configuration as users meet it: the shipped example, `FILE:LINE: key: problem` messages,
//! secrets kept out of every output, and `wpf-gateway check` exit codes.

use std::path::{Path, PathBuf};
use std::process::Command;

use wpf_gateway::config::{self, Mode, Respond};

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// Every `FILE:LINE: key:` prefix of a load error, in order.
fn prefixes(path: &Path) -> Vec<String> {
    let err = config::load(path).expect_err("config must be invalid");
    err.to_string()
        .lines()
        .map(|l| {
            let mut parts = l.splitn(4, ": ");
            let file_line = parts.next().unwrap_or_default();
            let key = parts.next().unwrap_or_default();
            format!("{file_line}: {key}:")
        })
        .collect()
}

const GOOD: &str = r#"[server]
listen = ["127.0.0.1:0"]
data_dir = "state"

[[site]]
name = "main"
upstream = "http://127.0.0.1:8081"
access_key = "GOOD-ACCESS-KEY-7f3a"
"#;

#[test]
fn example_file_loads_as_a_local_setup() {
    let path = example_path();
    let c = config::load(&path).unwrap_or_else(|e| panic!("example invalid:\n{e}"));
    assert_eq!(c.server.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
    assert_eq!(
        c.server.data_dir,
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
    );
    assert_eq!(c.admin.listen, Some("127.0.0.1:9180".parse().unwrap()));
    assert_eq!(c.sites.len(), 1);
    let site = &c.sites[0];
    assert!(site.hosts.is_empty(), "the example site is the catch-all");
    assert_eq!(site.upstream.to_string(), "http://127.0.0.1:8081");
    assert_eq!(site.mode, Mode::Relay);
    assert_eq!(site.respond, Respond::Async);
}

/// The commented-out `# key = value` lines of the example document the defaults: uncommenting
/// them must not change the loaded configuration.
#[test]
fn example_file_documents_the_real_defaults() {
    let text = std::fs::read_to_string(example_path()).unwrap();
    // Sections whose commented keys are defaults (limits, crm, store hold examples instead),
    // and keys whose comment is an example value rather than a default.
    let default_sections = ["[server]", "[admin]", "[log]", "[queue]", "[[site]]"];
    let examples = ["token_file", "access_key_file"];
    let mut section = "";
    let mut uncommented = 0;
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("# A second site") {
            break;
        }
        // A commented-out table header (`# [tls]`) starts a section too: its keys are
        // examples.
        let commented_table = line.strip_prefix("# ").is_some_and(|rest| {
            rest.starts_with('[') && rest.ends_with(']') && !rest.contains(' ')
        });
        if line.starts_with('[') || commented_table {
            section = line.trim();
        }
        let key = line
            .strip_prefix("# ")
            .and_then(|rest| rest.split_once(" = "))
            .map(|(key, _)| key)
            .filter(|key| key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        match key {
            Some(key) if default_sections.contains(&section) && !examples.contains(&key) => {
                out.push_str(&line[2..]);
                uncommented += 1;
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    assert!(uncommented >= 25, "only {uncommented} defaults found");
    let dir = tempfile::tempdir().unwrap();
    // Same directory name semantics: both files resolve `./data` against their own directory.
    let documented = config::load(&write(dir.path(), "a.toml", &out))
        .unwrap_or_else(|e| panic!("uncommented defaults invalid:\n{e}"));
    let plain = config::load(&write(dir.path(), "b.toml", &text)).unwrap();
    let strip_source = |c: config::Config| {
        format!(
            "{:?}",
            config::Config {
                source: PathBuf::new(),
                ..c
            }
        )
    };
    assert_eq!(strip_source(documented), strip_source(plain));
}

#[test]
fn several_errors_at_once_each_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bad.toml",
        r#"[server]
listen = ["127.0.0.1:8080", "nowhere"]
idle_timeout = "5 minutes"
max_header_size = "1KiB"

[[site]]
name = "Main"
upstream = "ftp://127.0.0.1"
access_key = "short"
mode = "fast"

[[site]]
name = "second"
hosts = ["example.com"]
upstream = "http://127.0.0.1:8081"
respond = "sync"
sync_timeout = "10s"
"#,
    );
    let f = path.display();
    assert_eq!(
        prefixes(&path),
        [
            format!("{f}:2: server.listen[1]:"),
            format!("{f}:3: server.idle_timeout:"),
            format!("{f}:4: server.max_header_size:"),
            format!("{f}:7: site[0].name:"),
            format!("{f}:8: site[0].upstream:"),
            format!("{f}:9: site[0].access_key:"),
            format!("{f}:10: site[0].mode:"),
            format!("{f}:12: site[1].access_key:"),
            format!("{f}:17: site[1].sync_timeout:"),
        ]
    );
    let shown = config::load(&path).unwrap_err().to_string();
    assert!(
        shown.contains("expected a duration like \"60s\""),
        "{shown}"
    );
    assert!(shown.contains("CRMs give up"), "{shown}");
}

#[test]
fn unknown_key_is_reported_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = GOOD.replace("data_dir", "dta_dir") + "upstream_timout = \"5s\"\n";
    let path = write(dir.path(), "typo.toml", &text);
    let f = path.display();
    assert_eq!(
        prefixes(&path),
        [
            format!("{f}:3: server.dta_dir:"),
            format!("{f}:9: site[0].upstream_timout:")
        ]
    );
    let shown = config::load(&path).unwrap_err().to_string();
    assert!(shown.contains("unknown key `upstream_timout`"), "{shown}");
}

#[test]
fn access_key_file_has_its_trailing_newline_stripped() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "main.key", "file-access-key-42\n");
    let text = GOOD.replace(
        "access_key = \"GOOD-ACCESS-KEY-7f3a\"",
        "access_key_file = \"main.key\"",
    );
    let c = config::load(&write(dir.path(), "gw.toml", &text)).unwrap();
    assert_eq!(c.sites[0].access_key.expose(), "file-access-key-42");
    assert_eq!(c.server.data_dir, dir.path().join("state"));
}

#[test]
fn missing_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let err = config::load(&path).unwrap_err();
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!("{}:0: (file): cannot read:", path.display())),
        "{shown}"
    );
}

#[test]
fn a_host_used_by_two_sites_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}hosts = [\"shop.test\"]\n\n[[site]]\nname = \"other\"\nhosts = [\"www.test\", \"SHOP.test\"]\nupstream = \"http://127.0.0.1:8082\"\naccess_key = \"other-key-123\"\n",
        GOOD
    );
    let path = write(dir.path(), "dup.toml", &text);
    assert_eq!(
        prefixes(&path),
        [format!("{}:13: site[1].hosts[1]:", path.display())]
    );
    let shown = config::load(&path).unwrap_err().to_string();
    assert!(
        shown.contains("\"shop.test\" is also a host of site[0]"),
        "{shown}"
    );
}

#[test]
fn non_loopback_admin_needs_a_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let open = format!("{GOOD}\n[admin]\nlisten = \"0.0.0.0:9180\"\n");
    let path = write(dir.path(), "admin.toml", &open);
    assert_eq!(
        prefixes(&path),
        [format!("{}:11: admin.listen:", path.display())]
    );

    write(dir.path(), "admin.token", "t0ken\n");
    let with_token = format!("{open}token_file = \"admin.token\"\n");
    let c = config::load(&write(dir.path(), "admin2.toml", &with_token)).unwrap();
    assert_eq!(c.admin.token_file, Some(dir.path().join("admin.token")));
}

#[test]
fn render_resolved_never_contains_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "crm.key", "CRM-KEY-Zq81-distinct\n");
    let text = format!(
        "{GOOD}\n[site.crm]\nkind = \"activecampaign\"\nurl = \"https://acct.api-us1.com\"\napi_key_file = \"crm.key\"\n\n[site.store]\nkind = \"wordpress\"\nurl = \"mysql://wp:DB-PASS-Kk2-distinct@127.0.0.1/wp\"\n"
    );
    let c = config::load(&write(dir.path(), "gw.toml", &text)).unwrap();
    let shown = config::render_resolved(&c);
    for secret in [
        "GOOD-ACCESS-KEY-7f3a",
        "CRM-KEY-Zq81-distinct",
        "DB-PASS-Kk2-distinct",
    ] {
        assert!(!shown.contains(secret), "{secret} shown in:\n{shown}");
    }
    // Everything else is there, defaults included.
    for expected in [
        "access_key = \"***\"",
        "api_key = \"***\"",
        "url = \"***\"",
        "workers = 4",
        "rate = \"5/s\"",
    ] {
        assert!(shown.contains(expected), "{expected} missing in:\n{shown}");
    }
}

#[test]
fn check_command_exits_1_with_located_problems_and_0_when_valid() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.toml",
        &GOOD
            .replace("\"127.0.0.1:0\"", "\"127.0.0.1\"")
            .replace("name = \"main\"", "name = \"main\"\nworkrs = 2"),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_wpf-gateway"))
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .expect("run wpf-gateway");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let f = bad.display();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].starts_with(&format!("{f}:2: server.listen[0]: ")),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with(&format!("{f}:7: site[0].workrs: unknown key")),
        "{stderr}"
    );

    let good = write(dir.path(), "good.toml", GOOD);
    let out = Command::new(env!("CARGO_BIN_EXE_wpf-gateway"))
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .expect("run wpf-gateway");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.is_empty());
    assert!(!stdout.contains("GOOD-ACCESS-KEY-7f3a"), "{stdout}");
}
