//! Endpoints come and go through the config source while traffic runs: a new endpoint
//! starts receiving requests, a removed one stops, and no request fails on the way.

use std::net::SocketAddr;
use std::time::Duration;

use trellis_e2e::{ControlPlane, EchoServer, Load, Proxy, free_port, http_get, wait_until};

use crate::request_path::loopback;

fn service() -> &'static str {
    r#"
apiVersion: v1
kind: Service
metadata: { name: web, namespace: demo }
spec:
  selector: { app: web }
  ports: [{ name: http, port: 80, targetPort: 8080 }]
---
apiVersion: local.trellis.dev/v1alpha1
kind: Workload
metadata: { name: client-1, namespace: demo, labels: { app: client } }
spec: { serviceAccount: client, meshAddress: "127.0.0.1:1" }
"#
}

fn workload(name: &str, inbound: SocketAddr) -> String {
    format!(
        "apiVersion: local.trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: demo, labels: {{ app: web }} }}\nspec: {{ serviceAccount: web, meshAddress: \"{inbound}\" }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_added_and_removed_under_load_fail_no_request() {
    let (web1_in, web2_in) = (loopback(free_port()), loopback(free_port()));
    let cp = ControlPlane::start(service()).await;
    let write = |name: &str, text: &str| {
        std::fs::write(cp.config_dir().join(name), text).unwrap();
    };
    write("web-1.yaml", &workload("web-1", web1_in));
    let web1_app = EchoServer::start("web-1").await;
    let web2_app = EchoServer::start("web-2").await;
    let client_app = EchoServer::start("client-1").await;
    let web1 = Proxy::start(&cp, "web-1", "demo", "web", web1_in, web1_app.addr).await;
    let web2 = Proxy::start(&cp, "web-2", "demo", "web", web2_in, web2_app.addr).await;
    let client_in = loopback(free_port());
    let client = Proxy::start(
        &cp,
        "client-1",
        "demo",
        "client",
        client_in,
        client_app.addr,
    )
    .await;
    wait_until(Duration::from_secs(10), || async {
        http_get(client.outbound, "web.demo", "/warm")
            .await
            .is_ok_and(|r| r.0 == 200)
    })
    .await
    .expect("web.demo never answered");

    // Four clients in a loop for the whole scenario.
    let load = Load::start(client.outbound, "web.demo", 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        web2_app.received().is_empty(),
        "web-2 is not an endpoint yet"
    );

    // A new endpoint appears in the config: it starts receiving requests.
    write("web-2.yaml", &workload("web-2", web2_in));
    wait_until(Duration::from_secs(10), || async {
        web2_app.received().len() >= 20
    })
    .await
    .unwrap_or_else(|()| panic!("web-2 never got traffic; client log:\n{}", client.log()));

    // The first endpoint is removed: it stops receiving requests.
    std::fs::remove_file(cp.config_dir().join("web-1.yaml")).unwrap();
    let settled = wait_until(Duration::from_secs(10), || async {
        let before = web1_app.received().len();
        tokio::time::sleep(Duration::from_millis(500)).await;
        web1_app.received().len() == before
    })
    .await;
    assert!(
        settled.is_ok(),
        "web-1 kept receiving requests after its removal"
    );
    let web1_final = web1_app.received().len();
    let web2_before = web2_app.received().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        web1_app.received().len(),
        web1_final,
        "web-1 got requests after removal"
    );
    assert!(
        web2_app.received().len() > web2_before + 50,
        "web-2 carries the traffic now"
    );

    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        failures.iter().take(5).collect::<Vec<_>>()
    );
    assert!(ok > 500, "only {ok} requests ran");
    drop((web1, web2));
}
