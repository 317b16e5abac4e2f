//! The WordPress user store against a real MariaDB (started by `crate::mariadb`): WordPress's
//! and WP Fusion's exact layout, strict reading, one user per contact under concurrent
//! gateways, and direct mode end to end with the CRM simulator.

use std::collections::BTreeMap;
use std::sync::Arc;

use hyper::StatusCode;
use sqlx::{Connection, MySqlConnection};
use wpf_gateway::config::{CrmKind, Secret};
use wpf_gateway::store::{
    lookup_user, NewUser, StoreError, UserChange, UserQuery, UserStore, WordPressOptions,
    WordPressStore,
};

use crate::direct::{config, contact, start, start_sim, webhook};

/// The shared MariaDB, or return from the test (with the message `server()` printed).
macro_rules! mariadb {
    () => {
        match crate::mariadb::server() {
            Some(server) => server,
            None => return,
        }
    };
}

const SITE: &str = "main";

fn options(slug: &str) -> WordPressOptions {
    WordPressOptions {
        table_prefix: "wp_".into(),
        crm_slug: slug.into(),
        meta_keys: vec!["first_name".into(), "last_name".into()],
        // The lowest cost bcrypt allows: the same code path, fast enough for tests.
        bcrypt_cost: 4,
    }
}

fn store(url: &str) -> WordPressStore {
    WordPressStore::connect(&Secret::new(url), options("activecampaign")).unwrap()
}

fn change(contact: &str, email: &str, tags: &[&str]) -> UserChange {
    UserChange {
        contact_id: contact.into(),
        email: email.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    }
}

fn add(contact: &str, email: &str, username: &str) -> UserChange {
    UserChange {
        create: Some(NewUser {
            username: username.into(),
            password: format!("pw-{contact}"),
            role: "subscriber".into(),
        }),
        ..change(contact, email, &["VIP", "Customer", "VIP"])
    }
}

fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn db(url: &str) -> MySqlConnection {
    MySqlConnection::connect(url).await.unwrap()
}

/// Every meta row of user `id`, key -> value (the last row of a repeated key).
async fn raw_meta(url: &str, id: u64) -> BTreeMap<String, String> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT meta_key, meta_value FROM wp_usermeta WHERE user_id = ?")
            .bind(id)
            .fetch_all(&mut db(url).await)
            .await
            .unwrap();
    rows.into_iter().collect()
}

async fn count_users(url: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM wp_users")
        .fetch_one(&mut db(url).await)
        .await
        .unwrap()
}

#[tokio::test]
async fn writes_wordpress_and_wp_fusion_layout() {
    let server = mariadb!();
    let url = server.wordpress_tables("wp_").await;
    let s = store(&url);
    let mut c = add("7", " Ann@Example.com ", "");
    c.meta = meta(&[("first_name", "Ann"), ("last_name", "Lee")]);
    let a = s.apply(SITE, c).await.unwrap();
    assert!(a.created);
    assert_eq!(
        a.changed,
        [
            "tags",
            "email",
            "role",
            "contact_id",
            "meta:first_name",
            "meta:last_name"
        ]
    );
    let u = &a.user;
    assert_eq!(
        (&*u.username, &*u.email, &*u.role, u.contact_id.as_deref()),
        (
            "Ann@Example.com",
            "Ann@Example.com",
            "subscriber",
            Some("7")
        )
    );
    assert_eq!(u.tags, ["VIP", "Customer"], "repeats dropped");

    let (login, pass, nicename, email, display, age): (
        String,
        String,
        String,
        String,
        String,
        i64,
    ) = sqlx::query_as(
        "SELECT user_login, user_pass, user_nicename, user_email, display_name, \
             TIMESTAMPDIFF(SECOND, user_registered, UTC_TIMESTAMP()) FROM wp_users WHERE ID = ?",
    )
    .bind(u.id)
    .fetch_one(&mut db(&url).await)
    .await
    .unwrap();
    assert_eq!(login, "Ann@Example.com");
    assert!(pass.starts_with("$2y$04$"), "{pass}");
    assert!(bcrypt::verify("pw-7", &pass).unwrap());
    assert_eq!(nicename, "annexample-com", "sanitize_title of the login");
    assert_eq!(email, "Ann@Example.com");
    assert_eq!(display, "Ann Lee");
    assert!(
        (0..120).contains(&age),
        "user_registered is UTC now: {age} s off"
    );

    let m = raw_meta(&url, u.id).await;
    assert_eq!(m["activecampaign_contact_id"], "7");
    assert_eq!(
        m["activecampaign_tags"],
        r#"a:2:{i:0;s:3:"VIP";i:1;s:8:"Customer";}"#
    );
    assert_eq!(m["wp_capabilities"], r#"a:1:{s:10:"subscriber";b:1;}"#);
    assert_eq!(m["wp_user_level"], "0");
    assert_eq!(m["nickname"], "Ann@Example.com");
    assert_eq!((&*m["first_name"], &*m["last_name"]), ("Ann", "Lee"));
    assert_eq!(m["rich_editing"], "true");

    // Found by contact id and by email in any case; the same user.
    let by_contact = s.by_contact(SITE, "7").await.unwrap().unwrap();
    let by_email = s.by_email(SITE, "ann@EXAMPLE.com").await.unwrap().unwrap();
    assert_eq!(by_contact.id, u.id);
    assert_eq!(by_email, by_contact);
    assert_eq!(
        by_contact.meta,
        meta(&[("first_name", "Ann"), ("last_name", "Lee")])
    );
    assert!(s.by_contact(SITE, "8").await.unwrap().is_none());

    // `add` again: the same user, nothing changed.
    let again = s
        .apply(SITE, add("7", "ann@example.com", ""))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(
        again.changed,
        ["email"],
        "the CRM's spelling of the email wins"
    );
    assert_eq!(count_users(&url).await, 1);

    // Tags emptied: WP Fusion deletes the meta row. A role: capabilities and level.
    let mut c = change("7", "ann@example.com", &[]);
    c.role = Some("editor".into());
    let a = s.apply(SITE, c).await.unwrap();
    assert_eq!(a.changed, ["tags", "role"]);
    let m = raw_meta(&url, u.id).await;
    assert!(!m.contains_key("activecampaign_tags"), "{m:?}");
    assert_eq!(m["wp_capabilities"], r#"a:1:{s:6:"editor";b:1;}"#);
    assert_eq!(m["wp_user_level"], "7");
    assert_eq!(
        s.by_contact(SITE, "7").await.unwrap().unwrap().role,
        "editor"
    );

    // No user, no `create`: nothing is made.
    let err = s
        .apply(SITE, change("9", "b@x.org", &[]))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NoMatchingUser { .. }), "{err:?}");

    // Usernames and nicenames stay unique, as WordPress keeps them.
    let b = s
        .apply(SITE, add("8", "b@x.org", "Ann@Example.com"))
        .await
        .unwrap();
    assert_eq!(b.user.username, "Ann@Example.com-2");
    let nicename: String = sqlx::query_scalar("SELECT user_nicename FROM wp_users WHERE ID = ?")
        .bind(b.user.id)
        .fetch_one(&mut db(&url).await)
        .await
        .unwrap();
    assert_eq!(nicename, "annexample-com-2");
    let c = s
        .apply(SITE, add("10", "c@x.org", "José Müller"))
        .await
        .unwrap();
    assert_eq!(c.user.username, "Jose Muller");

    // Another user's email is a conflict; nothing of the change is written.
    let mut c = change("8", "ANN@example.com", &["new"]);
    c.meta = meta(&[("first_name", "B")]);
    let err = s.apply(SITE, c).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let still = s.by_contact(SITE, "8").await.unwrap().unwrap();
    assert_eq!((still.email.as_str(), still.tags.len()), ("b@x.org", 2));
    s.close().await;
}

#[tokio::test]
async fn unreadable_meta_is_an_error_naming_user_and_key_and_is_never_overwritten() {
    let server = mariadb!();
    let url = server.wordpress_tables("wp_").await;
    let s = store(&url);
    let id = s
        .apply(SITE, add("7", "a@x.org", "a"))
        .await
        .unwrap()
        .user
        .id;
    for (key, bad) in [
        ("activecampaign_tags", r#"a:1:{i:0;s:9:"short";}"#),
        ("activecampaign_tags", r#"s:3:"VIP";"#),
        ("wp_capabilities", "i:5;"),
        ("first_name", r#"a:1:{i:0;"#),
    ] {
        sqlx::query("UPDATE wp_usermeta SET meta_value = ? WHERE user_id = ? AND meta_key = ?")
            .bind(bad)
            .bind(id)
            .bind(key)
            .execute(&mut db(&url).await)
            .await
            .unwrap();
        let mut c = change("7", "a@x.org", &["Other"]);
        c.meta = meta(&[("first_name", "New")]);
        let err = s.apply(SITE, c).await.unwrap_err();
        match &err {
            StoreError::UnreadableMeta {
                user_id, key: k, ..
            } => assert_eq!((*user_id, k.as_str()), (id, key)),
            other => panic!("{key}: {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains(&format!("user {id}")) && text.contains(key),
            "{text}"
        );
        assert_eq!(raw_meta(&url, id).await[key], bad, "left as it was");
        assert!(
            s.by_contact(SITE, "7").await.is_err(),
            "reading fails alike"
        );
        // Repair it for the next case.
        let good = match key {
            "activecampaign_tags" => r#"a:1:{i:0;s:3:"VIP";}"#,
            "wp_capabilities" => r#"a:1:{s:10:"subscriber";b:1;}"#,
            _ => "Ann",
        };
        sqlx::query("UPDATE wp_usermeta SET meta_value = ? WHERE user_id = ? AND meta_key = ?")
            .bind(good)
            .bind(id)
            .bind(key)
            .execute(&mut db(&url).await)
            .await
            .unwrap();
    }
    s.close().await;
}

#[tokio::test]
async fn meta_that_looks_serialized_is_stored_as_wordpress_would() {
    let server = mariadb!();
    let url = server.wordpress_tables("wp_").await;
    let s = store(&url);
    let mut c = add("7", "a@x.org", "a");
    c.meta = meta(&[("note", "a:0:{}"), ("city", "Oslo")]);
    let id = s.apply(SITE, c).await.unwrap().user.id;
    let m = raw_meta(&url, id).await;
    assert_eq!(
        m["note"], r#"s:6:"a:0:{}";"#,
        "maybe_serialize serializes it once more"
    );
    assert_eq!(m["city"], "Oslo");
    let mut c = change("7", "a@x.org", &["VIP", "Customer"]);
    c.meta = meta(&[("note", "a:0:{}"), ("city", "Bergen")]);
    let a = s.apply(SITE, c).await.unwrap();
    assert_eq!(a.changed, ["meta:city"], "the note reads back as itself");
    s.close().await;
}

/// Many `add`s for one contact (and for one email) at once, from two stores (two pools, as
/// two gateways): exactly one user, created exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_gateways_make_exactly_one_user() {
    let server = mariadb!();
    for same_contact in [true, false] {
        let url = server.wordpress_tables("wp_").await;
        let stores = [Arc::new(store(&url)), Arc::new(store(&url))];
        let mut tasks = Vec::new();
        for i in 0..16 {
            let s = stores[i % 2].clone();
            let contact = if same_contact {
                "7".to_owned()
            } else {
                format!("{}", 100 + i)
            };
            tasks.push(tokio::spawn(async move {
                s.apply(SITE, add(&contact, "same@x.org", &format!("u{i}")))
                    .await
            }));
        }
        let mut created = 0;
        for t in tasks {
            created += usize::from(t.await.unwrap().unwrap().created);
        }
        assert_eq!(created, 1, "same contact: {same_contact}");
        assert_eq!(count_users(&url).await, 1, "same contact: {same_contact}");
        for s in stores {
            s.close().await;
        }
    }
}

/// A contact id meta row left behind by a deleted user (no row in `wp_users`) is not a match:
/// the lookup takes the lowest id that is still a user, and with none the contact has no user.
/// What the store remembers of contacts is checked against the database on every lookup.
#[tokio::test]
async fn contact_lookup_skips_deleted_users_and_checks_what_it_remembers() {
    let server = mariadb!();
    let url = server.wordpress_tables("wp_").await;
    let orphan = "INSERT INTO wp_usermeta (user_id, meta_key, meta_value) \
                  VALUES (9999, 'activecampaign_contact_id', ?)";
    for contact in ["81", "82"] {
        sqlx::query(orphan)
            .bind(contact)
            .execute(&mut db(&url).await)
            .await
            .unwrap();
    }
    let s = store(&url);
    let made = s
        .apply(SITE, add("81", "live@x.org", "live"))
        .await
        .unwrap();
    assert!(made.created);
    let found = s.by_contact(SITE, "81").await.unwrap().unwrap();
    assert_eq!(found.id, made.user.id);
    assert!(s.by_contact(SITE, "82").await.unwrap().is_none());

    // The store remembers contact 81's user; another writer (WP Fusion on the site) moves
    // the link to contact 83: the remembered answer is checked, not trusted.
    sqlx::query(
        "UPDATE wp_usermeta SET meta_value = '83' \
         WHERE user_id = ? AND meta_key = 'activecampaign_contact_id'",
    )
    .bind(made.user.id)
    .execute(&mut db(&url).await)
    .await
    .unwrap();
    assert!(s.by_contact(SITE, "81").await.unwrap().is_none());
    let moved = s.by_contact(SITE, "83").await.unwrap().unwrap();
    assert_eq!(moved.id, made.user.id);
    s.close().await;
}

/// TLS to the database, optional through the URL (`?ssl-mode=…`, sqlx with rustls): verified
/// against the server's CA, the session is encrypted and the store works; against another CA
/// the store refuses the server and writes nothing.
#[tokio::test]
async fn tls_to_the_database_is_verified() {
    let server = mariadb!();
    let url = server.wordpress_tables("wp_").await;
    let verified = format!(
        "{url}?ssl-mode=verify_identity&ssl-ca={}",
        server.ca.display()
    );
    let (_, cipher): (String, String) = sqlx::query_as("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        .fetch_one(&mut db(&verified).await)
        .await
        .unwrap();
    assert!(!cipher.is_empty(), "the session is not encrypted");
    let s = store(&verified);
    assert!(
        s.apply(SITE, add("71", "tls@x.org", "tls"))
            .await
            .unwrap()
            .created
    );
    s.close().await;
    assert_eq!(count_users(&url).await, 1);

    let other = tempfile::tempdir().unwrap();
    let other_ca = crate::mariadb::write_certificates(other.path()).unwrap();
    let s = store(&format!(
        "{url}?ssl-mode=verify_ca&ssl-ca={}",
        other_ca.display()
    ));
    let refused = s.apply(SITE, add("72", "tls2@x.org", "tls2")).await;
    assert!(refused.is_err(), "{refused:?}");
    s.close().await;
    assert_eq!(count_users(&url).await, 1);
}

/// Updates of linked users take no store-wide lock, only the user's row lock: 16 concurrent
/// tag changes of one user from two stores (its tags meta row absent, so each would insert
/// it), four times over, leave exactly one tags row holding one of the round's changes;
/// changes of 8 users at once all land.
#[tokio::test]
async fn concurrent_updates_of_one_user_write_one_meta_row() {
    let server = mariadb!();
    let url = server.wordpress_tables("wp_").await;
    let stores = [Arc::new(store(&url)), Arc::new(store(&url))];
    let mut first = add("7", "one@x.org", "one");
    first.tags.clear();
    let user = stores[0].apply(SITE, first).await.unwrap().user;
    for i in 0..8 {
        let mut other = add(
            &format!("{}", 100 + i),
            &format!("u{i}@x.org"),
            &format!("u{i}"),
        );
        other.tags.clear();
        stores[1].apply(SITE, other).await.unwrap();
    }
    // Rounds: each starts with the tags row gone, so every change of the round would insert it.
    for round in 0..4 {
        sqlx::query(
            "DELETE FROM wp_usermeta WHERE user_id = ? AND meta_key = 'activecampaign_tags'",
        )
        .bind(user.id)
        .execute(&mut db(&url).await)
        .await
        .unwrap();
        let mut tasks = Vec::new();
        for i in 0..16 {
            let s = stores[i % 2].clone();
            tasks.push(tokio::spawn(async move {
                let tag = format!("r{round}-{i}");
                s.apply(SITE, change("7", "", &[tag.as_str()])).await
            }));
        }
        if round == 0 {
            for i in 0..8 {
                let s = stores[i % 2].clone();
                tasks.push(tokio::spawn(async move {
                    let contact = format!("{}", 100 + i);
                    s.apply(SITE, change(&contact, "", &["Gold"])).await
                }));
            }
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT meta_value FROM wp_usermeta WHERE user_id = ? AND meta_key = 'activecampaign_tags'",
        )
        .bind(user.id)
        .fetch_all(&mut db(&url).await)
        .await
        .unwrap();
        assert_eq!(rows.len(), 1, "round {round}: {rows:?}");
        assert!(rows[0].contains(&format!("\"r{round}-")), "{rows:?}");
    }
    let gold: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM wp_usermeta WHERE meta_key = 'activecampaign_tags' \
         AND meta_value = 'a:1:{i:0;s:4:\"Gold\";}'",
    )
    .fetch_one(&mut db(&url).await)
    .await
    .unwrap();
    assert_eq!(gold, 8);
    assert_eq!(count_users(&url).await, 9);
    for s in stores {
        s.close().await;
    }
}

/// Direct mode end to end: webhooks from the CRM simulator, users in MariaDB, and
/// `wpf-gateway user` reading them through the same store.
#[tokio::test]
async fn direct_mode_writes_the_wordpress_database() {
    let server = mariadb!();
    for kind in [CrmKind::ActiveCampaign, CrmKind::FluentCrm] {
        let url = server.wordpress_tables("wp_").await;
        let crm = start_sim(kind, vec![]).await;
        let created = crm
            .sim
            .create_contact(contact("", "Ann@Example.com", "Ann", &["VIP", "Customer"]))
            .unwrap();
        let id = created.id.clone();
        let store = format!("[site.store]\nkind = \"wordpress\"\nurl = \"{url}\"\n");
        let gw = start(&config(kind, &crm.url, "sync", "", &store)).await;

        let reply = webhook(&gw, &format!("wpf_action=add&contact_id={id}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{kind:?}: {}", reply.text());
        assert_eq!(reply.json()["status"], "done", "{}", reply.text());
        let reply = webhook(&gw, &format!("wpf_action=add&contact_id={id}")).await;
        assert_eq!(reply.json()["status"], "done", "{}", reply.text());
        assert_eq!(count_users(&url).await, 1, "add twice: one user");

        let (slug, tags) = match kind {
            CrmKind::FluentCrm => (
                "fluentcrm-rest",
                r#"a:2:{i:0;s:3:"vip";i:1;s:8:"customer";}"#,
            ),
            _ => (
                "activecampaign",
                r#"a:2:{i:0;s:3:"VIP";i:1;s:8:"Customer";}"#,
            ),
        };
        let config_file = gw.dir.path().join("gateway.toml");
        let loaded = wpf_gateway::config::load(&config_file).unwrap();
        let user = lookup_user(&loaded, SITE, &UserQuery::ContactId(id.clone()))
            .await
            .unwrap();
        let m = raw_meta(&url, user.id).await;
        assert_eq!(m[&format!("{slug}_contact_id")], id, "{kind:?}");
        assert_eq!(m[&format!("{slug}_tags")], tags, "{kind:?}");
        assert_eq!(user.meta["first_name"], "Ann");

        let mut changed = crm.sim.contact(&id).unwrap();
        changed.tags = vec!["Gold".into()];
        crm.sim.put_contact(changed).unwrap();
        let reply = webhook(&gw, &format!("wpf_action=update_tags&contact_id={id}")).await;
        assert_eq!(reply.json()["status"], "done", "{}", reply.text());
        let user = lookup_user(&loaded, SITE, &UserQuery::Email("ann@example.com".into()))
            .await
            .unwrap();
        assert_eq!(user.tags.len(), 1, "{kind:?}: {:?}", user.tags);
        let json = wpf_gateway::store::render_user_json(&user);
        assert!(!json.contains("$2y$"), "{json}");
        gw.stop().await;
    }
}

/// WordPress itself reads back what the gateway wrote: `get_user_by('email')`,
/// `wp_check_password()` on the generated password (6.1 verifies `$2y$` through phpass's
/// crypt fallback), `get_user_meta(…, 'activecampaign_tags', true)`, `get_userdata()->roles`;
/// `add` twice makes one user, and a user made by `wp_insert_user` is found by email and
/// linked. Our login and nicename sanitising agrees with WordPress's own functions.
#[tokio::test]
async fn wordpress_reads_back_what_the_gateway_wrote() {
    use crate::wp_php::{available, WordPressSite};
    use wpf_gateway::store::wordpress::{sanitize_title, sanitize_user};
    let server = mariadb!();
    if !available() {
        return;
    }
    let wp = WordPressSite::install(server, "activecampaign", "http://127.0.0.1:9", &[]).await;

    let names = [
        "Ann@Example.com",
        "  ann   lee ",
        "José Müller",
        "straße",
        "a<b>c</b>d",
        "x%20y",
        "x&amp;y",
        "o'neil+tag@x.org",
        "Dot.Name-1_x",
    ];
    let mut args = vec!["sanitize"];
    args.extend(names);
    let php = wp.php(&args).await;
    for (i, name) in names.iter().enumerate() {
        let login = sanitize_user(name);
        assert_eq!(php[i][0], login.as_str(), "sanitize_user({name:?})");
        assert_eq!(
            php[i][1],
            sanitize_title(&login).as_str(),
            "sanitize_title({login:?})"
        );
    }

    let bo_id = wp
        .php(&["insert_user", "bo", "Bo@Example.com", "bo-pass"])
        .await;
    let bo_id = bo_id
        .as_u64()
        .unwrap_or_else(|| panic!("wp_insert_user: {bo_id}"));
    let crm = start_sim(
        CrmKind::ActiveCampaign,
        vec![
            contact("41", "ann@example.com", "Ann", &["VIP", "Customer"]),
            contact("42", "bo@example.com", "Bo", &["Member"]),
        ],
    )
    .await;
    let extra = format!(
        "[site.store]\nkind = \"wordpress\"\nurl = \"{}\"\n\n[site.users]\nroles = [\"editor\"]\n",
        wp.url
    );
    let text = config(
        CrmKind::ActiveCampaign,
        &crm.url,
        "sync",
        "return_password_field = \"field:5\"\n",
        &extra,
    );
    // A short loopback lock: the return password's echo lock is over before the `update`.
    let gw = crate::support::TestGateway::start_with(&text, |c| {
        c.sites[0].loopback_lock = std::time::Duration::from_millis(300);
    })
    .await;

    for _ in 0..2 {
        let reply = webhook(&gw, "wpf_action=add&contact_id=41").await;
        assert_eq!(reply.json()["status"], "done", "{}", reply.text());
    }
    let password = crm.sim.contact("41").unwrap().fields["5"].clone();
    let ann = wp.php(&["user", "ann@example.com"]).await;
    assert_eq!(ann["login"], "ann@example.com", "{ann}");
    assert_eq!(ann["nicename"], "annexample-com", "{ann}");
    assert_eq!(ann["display_name"], "Ann Lee", "{ann}");
    assert_eq!(ann["roles"], serde_json::json!(["subscriber"]), "{ann}");
    assert_eq!(ann["tags"], serde_json::json!(["VIP", "Customer"]), "{ann}");
    assert_eq!(ann["contact_id"], "41", "{ann}");
    assert_eq!(ann["first_name"], "Ann", "{ann}");
    assert_eq!(
        ann["users"], 3,
        "admin, bo and one ann after two adds: {ann}"
    );
    assert_eq!(
        wp.php(&["check_password", "ann@example.com", &password])
            .await,
        true,
        "wp_check_password on the generated password"
    );
    assert_eq!(
        wp.php(&["check_password", "ann@example.com", "wrong"])
            .await,
        false
    );

    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let reply = webhook(&gw, "wpf_action=update&contact_id=41&role=editor").await;
    assert_eq!(reply.json()["status"], "done", "{}", reply.text());
    let mut changed = crm.sim.contact("41").unwrap();
    changed.tags = vec!["Gold".into()];
    crm.sim.put_contact(changed).unwrap();
    let reply = webhook(&gw, "wpf_action=update_tags&contact_id=41").await;
    assert_eq!(reply.json()["status"], "done", "{}", reply.text());
    let ann = wp.php(&["user", "ann@example.com"]).await;
    assert_eq!(ann["roles"], serde_json::json!(["editor"]), "{ann}");
    assert_eq!(ann["level"], 7, "{ann}");
    assert_eq!(ann["tags"], serde_json::json!(["Gold"]), "{ann}");

    // Bo was made by WordPress; the CRM's `update` finds him by email and links him.
    let reply = webhook(&gw, "wpf_action=update&contact_id=42").await;
    assert_eq!(reply.json()["status"], "done", "{}", reply.text());
    let bo = wp.php(&["user", "bo@example.com"]).await;
    assert_eq!(bo["id"], bo_id, "{bo}");
    assert_eq!(bo["contact_id"], "42", "{bo}");
    assert_eq!(bo["tags"], serde_json::json!(["Member"]), "{bo}");
    assert_eq!(bo["roles"], serde_json::json!(["subscriber"]), "{bo}");
    assert_eq!(bo["users"], 3, "{bo}");
    assert_eq!(
        wp.php(&["check_password", "bo@example.com", "bo-pass"])
            .await,
        true,
        "his password is left alone"
    );
    gw.stop().await;
}

/// `[site.store] notify = true`: after the change the gateway calls the companion mu-plugin on
/// the site (real WordPress under `php -S`), which fires `wpf_tags_modified`. While the site is
/// down the user is already saved and the job retries; once it is up, the retry notifies. A
/// wrong key is refused.
#[tokio::test]
async fn notify_reaches_the_mu_plugin_and_a_failed_notify_is_retried() {
    use crate::support::{send, TestGateway};
    use crate::wp_php::{available, WordPressSite};
    use std::time::{Duration, Instant};
    let server = mariadb!();
    if !available() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let home = format!("http://127.0.0.1:{port}");
    let key = "test-key-123";
    let wp =
        WordPressSite::install(server, "activecampaign", &home, &[("WPF_GATEWAY_KEY", key)]).await;
    let plugin = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/wordpress/wpf-gateway.php"),
    )
    .unwrap();
    wp.mu_plugin("wpf-gateway.php", &plugin);
    let log = wp.dir.path().join("modified.log");
    wp.mu_plugin(
        "record.php",
        &format!(
            "<?php\nadd_action( 'wpf_tags_modified', function ( $id, $tags ) {{\n\
             \tfile_put_contents( '{}', $id . ':' . implode( ',', $tags ) . \"\\n\", FILE_APPEND );\n\
             }}, 10, 2 );\n",
            log.display()
        ),
    );

    let crm = start_sim(
        CrmKind::ActiveCampaign,
        vec![contact("51", "cy@example.com", "Cy", &["VIP", "Customer"])],
    )
    .await;
    let extra = format!(
        "[site.store]\nkind = \"wordpress\"\nurl = \"{}\"\nnotify = true\n",
        wp.url
    );
    let text = config(CrmKind::ActiveCampaign, &crm.url, "async", "", &extra).replace(
        "upstream = \"http://127.0.0.1:9\"",
        &format!("upstream = \"{home}\""),
    );
    let gw = TestGateway::start_with(&text, |c| {
        c.queue.retry_schedule = vec![Duration::from_millis(300)];
        c.queue.retry_until = Duration::from_secs(30);
    })
    .await;

    // The site is down: the user is saved all the same, and nobody was told.
    let reply = webhook(&gw, "wpf_action=add&contact_id=51").await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    let deadline = Instant::now() + Duration::from_secs(20);
    let user = loop {
        let user = wp.php(&["user", "cy@example.com"]).await;
        if !user.is_null() {
            break user;
        }
        assert!(Instant::now() < deadline, "the user was never saved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        user["tags"],
        serde_json::json!(["VIP", "Customer"]),
        "{user}"
    );
    assert!(!log.exists(), "no notify reached a site that is down");

    // The site comes up: the job's retry notifies it.
    let site = wp.serve(port).await;
    let expected = format!("{}:VIP,Customer\n", user["id"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&log).unwrap_or_default() != expected {
        assert!(
            Instant::now() < deadline,
            "notify never arrived: {:?}",
            std::fs::read_to_string(&log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(wp.php(&["user", "cy@example.com"]).await["users"], 2);

    // The endpoint wants the key.
    let forged = hyper::Request::post(format!("{home}/?wpf_gateway=user_changed"))
        .header("x-wpf-gateway-key", "wrong")
        .body(http_body_util::Full::new(bytes::Bytes::from(format!(
            "{{\"user_id\":{}}}",
            user["id"]
        ))))
        .unwrap();
    let reply = send(forged).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        expected,
        "not fired"
    );
    site.stop().await;
    gw.stop().await;
}
