//! The bus does not trust anyone: the three services run against a
//! nats-server configured with the shipped per-service permissions
//! (`observability/nats/permissions.conf`), do their whole job under them,
//! and a forged decision or report from a connection not entitled to it is
//! refused. Plus each credential kind the services accept (token, nkey,
//! user/password over TLS with a CA).

use std::time::Duration;

use async_nats::jetstream;
use serde_json::json;
use testkit::nats::{NatsServer, ServerOptions};
use testkit::stack::{Component, DEMO_KEY, Stack};

fn repo_file(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// A random password for one service.
fn password() -> String {
    (0..24)
        .map(|_| fastrand::alphanumeric())
        .collect::<String>()
}

struct Passwords {
    gateway: String,
    router: String,
    worker: String,
}

impl Passwords {
    fn of(&self, component: Component) -> &str {
        match component {
            Component::Gateway => &self.gateway,
            Component::Router => &self.router,
            Component::Worker => &self.worker,
        }
    }
}

/// A nats-server with the shipped permissions and a log to check.
async fn secured_server(passwords: &Passwords) -> NatsServer {
    let permissions = std::fs::read_to_string(repo_file("observability/nats/permissions.conf"))
        .expect("observability/nats/permissions.conf");
    NatsServer::start_with(ServerOptions {
        config: permissions,
        env: vec![
            (
                "NATS_GATEWAY_PASSWORD".to_owned(),
                passwords.gateway.clone(),
            ),
            ("NATS_ROUTER_PASSWORD".to_owned(), passwords.router.clone()),
            ("NATS_WORKER_PASSWORD".to_owned(), passwords.worker.clone()),
        ],
        log: true,
        ..Default::default()
    })
    .await
}

/// Starts `component` as its own NATS user.
async fn start_as_user(stack: &mut Stack, url: &str, passwords: &Passwords, component: Component) {
    stack.extra_env = [
        ("NATS_URL", url.to_owned()),
        ("NATS_USER", component.name().to_owned()),
        ("NATS_PASSWORD", passwords.of(component).to_owned()),
        (
            "ROUTER_POLICY_FILE",
            repo_file("observability/stack/policy.yaml")
                .display()
                .to_string(),
        ),
        (
            "ROUTER_EXTENSIONS_FILE",
            repo_file("observability/stack/extensions.yaml")
                .display()
                .to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    stack.start(component).await;
}

async fn connect_as(url: &str, user: &str, password: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.to_owned(), password.to_owned())
        .request_timeout(Some(Duration::from_secs(2)))
        .custom_inbox_prefix(format!("_INBOX.{user}"))
        .connect(url)
        .await
        .expect("connect with a service's credentials")
}

fn violations(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("Violation")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_work_under_per_service_permissions_and_forged_messages_are_refused() {
    let passwords = Passwords {
        gateway: password(),
        router: password(),
        worker: password(),
    };
    let server = secured_server(&passwords).await;
    let url = server.url();
    let mut stack = Stack::new().await;
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        start_as_user(&mut stack, &url, &passwords, component).await;
    }

    // The whole job under the permissions: submit, route through the
    // pii-guard extension (router → worker request/reply), execute, report,
    // an approval decided through the gateway.
    let plain = stack.submit_ok(&testkit::stack::sample_run()).await;
    let run = stack
        .wait_terminal(
            plain["run_id"].as_str().expect("run id"),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(run["status"], "succeeded", "{run}");

    let approval_run = json!({
        "flow_id": "needs-approval",
        "steps": [
            {"id": "gate", "type": "approval", "input": {"prompt": "ok?", "timeout_s": 120}},
            {"id": "after", "type": "noop"}
        ]
    });
    let forged_target = stack.submit_ok(&approval_run).await;
    let forged_id = forged_target["run_id"].as_str().expect("run id").to_owned();
    stack
        .wait_status(&forged_id, Duration::from_secs(30), |s| {
            s == "awaiting_approval"
        })
        .await;
    assert!(
        violations(&server.log()).is_empty(),
        "the services hit permission violations doing their job:\n{}",
        violations(&server.log()).join("\n")
    );

    // A connection without credentials is not let in at all.
    let anonymous = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(url.as_str())
        .await;
    assert!(
        anonymous.is_err(),
        "a connection without credentials was accepted"
    );

    // The worker's credentials cannot write an approval decision...
    let worker = connect_as(&url, "worker", &passwords.worker).await;
    let worker_js = jetstream::new(worker.clone());
    let decisions = worker_js
        .get_key_value(wire::approvals::BUCKET)
        .await
        .expect("the worker may open (read) the approvals bucket");
    let key = format!("{forged_id}.gate");
    let forged = wire::approvals::ApprovalDecision {
        verdict: wire::approvals::Verdict::Approved,
        comment: Some("forged".to_owned()),
        tenant_id: wire::ids::TenantId::parse("demo").expect("tenant"),
        at: time::OffsetDateTime::now_utc(),
    };
    let written = decisions.create(&key, forged.encode()).await;
    assert!(written.is_err(), "the worker wrote an approval decision");
    // ...nor a put (the other way to write a key).
    let put = decisions.put(&key, forged.encode()).await;
    assert!(put.is_err(), "the worker put an approval decision");

    // The gateway's credentials cannot publish a report on runs.events.
    let gateway = connect_as(&url, "gateway", &passwords.gateway).await;
    let gateway_js = jetstream::new(gateway.clone());
    let report = wire::events::RunEvent {
        run_id: wire::ids::RunId::parse(forged_id.clone()).expect("run id"),
        tenant_id: wire::ids::TenantId::parse("demo").expect("tenant"),
        status: wire::run::RunStatus::Succeeded,
        provider: None,
        steps: Vec::new(),
        error: None,
        at: time::OffsetDateTime::now_utc(),
    };
    let published = async {
        gateway_js
            .publish(wire::events::SUBJECT, report.encode())
            .await?
            .await
    }
    .await;
    assert!(
        published.is_err(),
        "the gateway's user published on runs.events"
    );

    // None of it landed: the decision is not there, the run still waits.
    assert!(
        decisions.get(&key).await.expect("read decision").is_none(),
        "a forged decision is stored"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still = stack.get_run_as(DEMO_KEY, &forged_id).await;
    let still: serde_json::Value = still.json().await.expect("run JSON");
    assert_eq!(still["status"], "awaiting_approval", "{still}");

    // The server refused exactly the forged messages.
    let log = server.log();
    let refused = violations(&log);
    assert!(
        refused
            .iter()
            .any(|l| l.contains("worker") && l.contains("$KV.beamline_approvals")),
        "no refusal of the worker's decision in the server log:\n{log}"
    );
    assert!(
        refused
            .iter()
            .any(|l| l.contains("gateway") && l.contains("runs.events")),
        "no refusal of the gateway's report in the server log:\n{log}"
    );
    assert!(
        refused
            .iter()
            .all(|l| l.contains("$KV.beamline_approvals") || l.contains("runs.events")),
        "unexpected violations:\n{}",
        refused.join("\n")
    );

    // And the stack still works: the real decision through the API lands.
    let decided = stack
        .decide(DEMO_KEY, &forged_id, "gate", "approve", Some("real"))
        .await;
    assert!(decided.status().is_success(), "{}", decided.status());
    let run = stack
        .wait_terminal(&forged_id, Duration::from_secs(30))
        .await;
    assert_eq!(run["status"], "succeeded", "{run}");

    // No password reached a log line.
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        let process = stack.process(component);
        for line in process.stdout().iter().chain(process.stderr().iter()) {
            for secret in [&passwords.gateway, &passwords.router, &passwords.worker] {
                assert!(
                    !line.contains(secret.as_str()),
                    "{}: a password was logged: {line}",
                    component.name()
                );
            }
        }
    }
}

/// Starts only the gateway against `server` with `env` and checks that a run
/// is accepted (its publish to JetStream was acknowledged).
async fn gateway_publishes_with(url: &str, env: Vec<(&str, String)>) {
    let mut stack = Stack::new().await;
    stack.extra_env = env
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .chain([("NATS_URL".to_owned(), url.to_owned())])
        .collect();
    stack.start(Component::Gateway).await;
    stack.submit_ok(&testkit::stack::sample_run()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_authenticate_with_a_token_an_nkey_and_tls_with_a_ca() {
    // Token.
    let token = password();
    let server = NatsServer::start_with(ServerOptions {
        config: "authorization { token: $TEST_TOKEN }\n".to_owned(),
        env: vec![("TEST_TOKEN".to_owned(), token.clone())],
        ..Default::default()
    })
    .await;
    gateway_publishes_with(&server.url(), vec![("NATS_TOKEN", token)]).await;
    drop(server);

    // Nkey: the server knows only the public key; the seed is in a file.
    let dir = tempfile::tempdir().expect("temp dir");
    let user = nkeys::KeyPair::new_user();
    let seed_file = dir.path().join("gateway.nk");
    std::fs::write(&seed_file, user.seed().expect("seed")).expect("write seed");
    let server = NatsServer::start_with(ServerOptions {
        config: format!(
            "authorization {{ users: [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
        ..Default::default()
    })
    .await;
    gateway_publishes_with(
        &server.url(),
        vec![("NATS_NKEY_SEED_FILE", seed_file.display().to_string())],
    )
    .await;
    drop(server);

    // TLS with a CA (the server's self-signed certificate) + user/password.
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("self-signed certificate");
    let cert = dir.path().join("server.pem");
    let key = dir.path().join("server-key.pem");
    std::fs::write(&cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
    let password = password();
    let server = NatsServer::start_with(ServerOptions {
        config: format!(
            "tls {{ cert_file: \"{}\", key_file: \"{}\" }}\n\
             authorization {{ user: svc, password: $TEST_PASSWORD }}\n",
            cert.display(),
            key.display()
        ),
        env: vec![("TEST_PASSWORD".to_owned(), password.clone())],
        ..Default::default()
    })
    .await;
    gateway_publishes_with(
        &server.url(),
        vec![
            ("NATS_USER", "svc".to_owned()),
            ("NATS_PASSWORD", password),
            ("NATS_TLS_CA_FILE", cert.display().to_string()),
        ],
    )
    .await;
}

/// base64url without padding (JWT segments).
fn b64url(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A NATS JWT (`ed25519-nkey`) for `subject`, signed by `issuer`.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let header = b64url(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = json!({
        "jti": format!("{:016X}{:016X}", fastrand::u64(..), fastrand::u64(..)),
        "iat": time::OffsetDateTime::now_utc().unix_timestamp(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = format!("{header}.{}", b64url(claims.to_string().as_bytes()));
    let signature = issuer.sign(body.as_bytes()).expect("sign");
    format!("{body}.{}", b64url(&signature))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_authenticate_with_a_creds_file() {
    // Decentralized auth: an operator, an account with JetStream, a user
    // whose JWT and seed are the `.creds` file.
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    // JetStream needs the server's system account.
    let system = nkeys::KeyPair::new_account();
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        "beamline-test",
        json!({"type": "operator", "version": 2, "system_account": system.public_key()}),
    );
    let system_jwt = nats_jwt(
        &operator,
        &system.public_key(),
        "SYS",
        json!({"type": "account", "version": 2, "limits": {"subs": -1, "data": -1, "payload": -1, "conn": -1}}),
    );
    let account_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        "beamline",
        json!({
            "type": "account", "version": 2,
            "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
                "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
            }
        }),
    );
    let user_jwt = nats_jwt(
        &account,
        &user.public_key(),
        "gateway",
        json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let creds = dir.path().join("gateway.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().expect("seed")
        ),
    )
    .expect("write creds");
    let server = NatsServer::start_with(ServerOptions {
        config: format!(
            "operator: {operator_jwt}\nsystem_account: {}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {}: {system_jwt}\n  {}: {account_jwt}\n}}\n",
            system.public_key(),
            system.public_key(),
            account.public_key()
        ),
        ..Default::default()
    })
    .await;
    // Without the creds the server lets nobody in.
    assert!(
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(server.url())
            .await
            .is_err(),
        "operator mode accepted a connection without credentials"
    );
    gateway_publishes_with(
        &server.url(),
        vec![("NATS_CREDS_FILE", creds.display().to_string())],
    )
    .await;
}
