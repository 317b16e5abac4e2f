//! `wpf-gateway user` as users meet it: the real binary reads a store that the library wrote,
//! prints the user as JSON (never a password hash) and exits 1 with a message when there is
//! no such user, no such site, or a store that cannot be read.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use wpf_gateway::store::{EmbeddedOptions, EmbeddedStore, NewUser, UserChange, UserStore};

const CONFIG: &str = r#"[server]
listen = ["127.0.0.1:0"]
data_dir = "state"

[[site]]
name = "main"
hosts = ["example.com"]
upstream = "http://127.0.0.1:8081"
access_key = "STORE-TEST-ACCESS-KEY-1"

[[site]]
name = "wp"
hosts = ["wp.example.com"]
upstream = "http://127.0.0.1:8082"
access_key = "STORE-TEST-ACCESS-KEY-2"
[site.store]
kind = "wordpress"
url = "mysql://wp:secret@127.0.0.1:9/wp"
crm_slug = "activecampaign"
"#;

fn user_command(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wpf-gateway"))
        .arg("user")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run wpf-gateway user")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A config in a tempdir and, in its `data_dir`, a store holding the user of contact 7.
async fn setup(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("gw.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let store = EmbeddedStore::open_with(&dir.join("state"), EmbeddedOptions { bcrypt_cost: 4 })
        .await
        .unwrap();
    store
        .apply(
            "main",
            UserChange {
                contact_id: "7".into(),
                email: "Ann@Example.com".into(),
                tags: vec!["Customer".into(), "VIP".into()],
                meta: BTreeMap::from([("first_name".to_owned(), "Ann".to_owned())]),
                role: None,
                create: Some(NewUser {
                    username: "ann".into(),
                    password: "hunter2-store-test".into(),
                    role: "subscriber".into(),
                }),
            },
        )
        .await
        .unwrap();
    store.close().await;
    config
}

#[tokio::test]
async fn user_prints_the_stored_user_as_json_without_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path()).await;
    for args in [
        ["--site", "main", "--contact-id", "7"],
        ["--site", "main", "--email", "ann@EXAMPLE.com"],
    ] {
        let out = user_command(&config, &args);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        assert!(
            !stdout.contains("$2y$") && !stdout.contains("hunter2"),
            "{stdout}"
        );
        let json: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
        assert_eq!(json["id"], 1);
        assert_eq!(json["username"], "ann");
        assert_eq!(json["email"], "Ann@Example.com");
        assert_eq!(json["role"], "subscriber");
        assert_eq!(json["contact_id"], "7");
        assert_eq!(json["tags"], serde_json::json!(["Customer", "VIP"]));
        assert_eq!(json["meta"], serde_json::json!({"first_name": "Ann"}));
        for time in ["created", "updated"] {
            let t = json[time].as_str().unwrap_or_default();
            assert!(
                t.len() >= 20 && t.ends_with('Z') && t.contains('T'),
                "{time}: {t}"
            );
        }
    }
}

#[tokio::test]
async fn user_exits_1_with_a_message_when_there_is_nothing_to_print() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path()).await;
    let cases: [(&[&str], &str); 4] = [
        (
            &["--site", "main", "--contact-id", "8"],
            "no user of site \"main\" is linked to contact 8",
        ),
        (
            &["--site", "main", "--email", "bob@example.com"],
            "no user of site \"main\" has the email bob@example.com",
        ),
        (
            &["--site", "shop", "--contact-id", "7"],
            "no site named \"shop\"",
        ),
        // Read through the WordPress store: here its database is down (nothing listens on
        // the discard port), and the message never shows the URL's password.
        (
            &["--site", "wp", "--contact-id", "7"],
            "user store unavailable",
        ),
    ];
    for (args, message) in cases {
        let out = user_command(&config, args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(
            !stderr.contains("secret"),
            "the store url's password: {stderr}"
        );
    }
}

#[test]
fn user_reports_config_errors_and_a_missing_store_like_check() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    std::fs::write(
        &config,
        CONFIG.replace("[server]", "[server]\nlisten_typo = 1"),
    )
    .unwrap();
    let out = user_command(&config, &["--site", "main", "--contact-id", "7"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:2: server.listen_typo", config.display())),
        "{stderr}"
    );

    std::fs::write(&config, CONFIG).unwrap();
    let out = user_command(&config, &["--site", "main", "--contact-id", "7"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("users.sqlite does not exist"), "{stderr}");
    assert!(
        !dir.path().join("state").join("users.sqlite").exists(),
        "read-only: nothing made"
    );
}
