//! Authorization policies end to end: a `policy.trellis.dev` AuthorizationPolicy in the
//! control plane's config directory reaches the destination proxy, which refuses what it
//! does not allow before the app sees anything; a live edit applies to the next request,
//! a broken edit keeps the policies in force, and so does a control plane that is gone.

use std::time::Duration;

use bytes::Bytes;
use trellis_e2e::{http_request, wait_until};

use crate::request_path::{Mesh, start_mesh};

/// Only `client` may call web, and only to read; nobody reaches /admin.
const POLICIES: &str = r#"
apiVersion: policy.trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: web-readers, namespace: demo }
spec:
  targetRefs: [{ kind: Service, name: web }]
  rules:
    - from: [{ serviceAccounts: [client] }]
      to: [{ methods: [GET] }]
---
apiVersion: policy.trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: web-no-admin, namespace: demo }
spec:
  action: DENY
  rules:
    - to: [{ paths: ["/admin", "/admin/*"] }]
"#;

/// The policies web's proxy enforces, as its `/config` lists them.
async fn applied(m: &Mesh) -> Vec<String> {
    m.web.config().await["discovery"]["authorization"]["applied"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["policy"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

async fn status(m: &Mesh, method: http::Method, path: &str) -> (u16, String) {
    let (status, _, body) = http_request(m.client.outbound, method, "web.demo", path, Bytes::new())
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_refuse_before_the_app_follow_edits_and_survive_the_control_plane() {
    let mut m = start_mesh().await;
    assert_eq!(status(&m, http::Method::POST, "/before").await.0, 200);

    std::fs::write(m.cp.config_dir().join("policy.yaml"), POLICIES).unwrap();
    let enforced = wait_until(Duration::from_secs(10), || async {
        applied(&m).await == ["demo/web-no-admin", "demo/web-readers"]
    })
    .await;
    assert!(
        enforced.is_ok(),
        "web's proxy never enforced the policies: {:?}\n{}",
        applied(&m).await,
        m.web.log()
    );

    assert_eq!(status(&m, http::Method::GET, "/hello").await.0, 200);
    let refused = [
        (http::Method::POST, "/hello"),
        (http::Method::GET, "/admin"),
        (http::Method::GET, "/admin/users"),
        // The same resource spelled otherwise: normalized before matching.
        (http::Method::GET, "/public/../admin"),
        (http::Method::GET, "//admin/users"),
        (http::Method::GET, "/%61dmin"),
    ];
    for (method, path) in &refused {
        assert_eq!(
            status(&m, method.clone(), path).await,
            (403, "RBAC: access denied".to_owned()),
            "{method} {path}"
        );
    }
    // The app saw the request before the policies and the one allowed GET, nothing else.
    let seen: Vec<String> = m
        .web_app
        .received()
        .into_iter()
        .map(|r| format!("{} {}", r.method, r.path_and_query))
        .collect();
    assert_eq!(seen, ["POST /before", "GET /hello"]);
    let denied = |policy: &'static str| {
        let web = &m.web;
        async move {
            web.metric(&format!(
                "trellis_proxy_authorization_decisions_total{{decision=\"deny\",policy=\"{policy}\"}}"
            ))
            .await
        }
    };
    assert_eq!(denied("demo/web-no-admin").await, Some(5.0));
    assert_eq!(
        denied("-").await,
        Some(1.0),
        "POST: no ALLOW policy matched"
    );
    // The access log (written in batches) names the policy that refused.
    assert!(
        m.web.wait_log("denied by policy demo/web-no-admin").await,
        "{}",
        m.web.log()
    );
    assert!(
        m.web
            .access_log()
            .iter()
            .any(|l| l.contains("/admin/users") && l.contains("denied by policy demo/web-no-admin")),
        "{}",
        m.web.log()
    );

    // A live edit: the client's account is no longer allowed; the next request is refused.
    std::fs::write(
        m.cp.config_dir().join("policy.yaml"),
        POLICIES.replace(
            "serviceAccounts: [client]",
            "serviceAccounts: [someone-else]",
        ),
    )
    .unwrap();
    wait_until(Duration::from_secs(10), || async {
        status(&m, http::Method::GET, "/hello").await.0 == 403
    })
    .await
    .expect("the edited policy never applied");
    // GETs sent while the edit travelled were still allowed; none from here on is.
    let reached = m.web_app.received().len();
    let version = m.web.config().await["discovery"]["version"].clone();

    // A broken edit is refused naming the field; the policies in force stay in force.
    std::fs::write(
        m.cp.config_dir().join("policy.yaml"),
        POLICIES.replace("methods: [GET]", "ports: [0]"),
    )
    .unwrap();
    let source = m.cp.source_status_with("policy.yaml").await;
    let err = source["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("spec.rules[0].to[0].ports[0]"), "{err}");
    assert_eq!(m.web.config().await["discovery"]["version"], version);
    assert_eq!(status(&m, http::Method::GET, "/hello").await.0, 403);

    // The control plane gone: the proxy keeps enforcing its last good view.
    m.cp.kill().await;
    wait_until(Duration::from_secs(10), || async {
        m.web.metric("trellis_proxy_discovery_connected").await == Some(0.0)
    })
    .await
    .expect("the proxy did not notice the control plane was gone");
    assert_eq!(status(&m, http::Method::GET, "/hello").await.0, 403);
    assert_eq!(status(&m, http::Method::GET, "/admin").await.0, 403);
    assert_eq!(
        m.web_app.received().len(),
        reached,
        "nothing refused reached the app"
    );
}
