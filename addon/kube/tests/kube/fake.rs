//! A fake Kubernetes API server: a `tower::Service` over an in-memory store that answers
//! LIST and WATCH the way kube-rs's watcher uses them.
//!
//! - LIST `GET /api/v1/pods?limit=500`: every object of the resource (filtered by the
//!   path's namespace and a `metadata.name=` field selector), with the list's
//!   `resourceVersion`.
//! - WATCH `GET ...?watch=true&resourceVersion=N`: a streaming body of newline-delimited
//!   `{"type":"ADDED|MODIFIED|DELETED|ERROR","object":...}` events: first every recorded
//!   change after `N`, then changes as they happen. A version older than the last
//!   [`FakeApi::expire_watches`] gets `ERROR` 410 Gone, as from a compacted etcd.
//!
//! Every write bumps one global resource version, as in etcd. Tests inject failures:
//! HTTP errors for the next requests of a resource, 410 Gone on open watches, closed
//! watches, and lists held back until released.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use hyper::body::{Body, Frame};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

/// The fake server; clones share one store.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

/// A response body fed from a channel: whole for a LIST, open-ended for a WATCH.
pub struct FakeBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
}

#[derive(Default)]
struct State {
    /// The last resource version handed out.
    rv: u64,
    /// Objects by resource (URL plural), then `(namespace, name)`.
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    /// Every change, oldest first, for watches resuming from a version.
    history: Vec<Change>,
    /// Per resource: watches from a version below this get 410 Gone.
    compacted: BTreeMap<String, u64>,
    watches: Vec<OpenWatch>,
    /// Per resource: status codes for its next requests.
    failures: BTreeMap<String, VecDeque<u16>>,
    /// Per resource: `false` while lists are held back.
    gates: BTreeMap<String, watch::Sender<bool>>,
    /// `(resource, is_watch)` of every request, in order.
    requests: Vec<(String, bool)>,
}

struct Change {
    rv: u64,
    resource: String,
    namespace: String,
    name: String,
    event: &'static str,
    object: Value,
}

struct OpenWatch {
    route: Route,
    tx: mpsc::UnboundedSender<Bytes>,
}

/// What a request asks for.
#[derive(Clone, Debug)]
struct Route {
    resource: String,
    /// The path's namespace, `None` for all namespaces (or a cluster-scoped kind).
    namespace: Option<String>,
    /// From a `metadata.name=` field selector.
    name: Option<String>,
    watch: bool,
    resource_version: Option<u64>,
}

// === impl FakeApi ===

impl FakeApi {
    /// A client of this server, as the source under test gets it.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.clone(), "default")
    }

    /// Creates or replaces `obj` (ADDED or MODIFIED), returning its resource version.
    pub fn apply<K: k8s_openapi::Resource + Serialize>(&self, obj: &K) -> u64 {
        let mut object = serde_json::to_value(obj).unwrap_or_default();
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let mut state = self.lock();
        state.rv += 1;
        let rv = state.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let previous = state
            .objects
            .entry(K::URL_PATH_SEGMENT.to_owned())
            .or_default()
            .insert((namespace.clone(), name.clone()), object.clone());
        let event = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.record(Change {
            rv,
            resource: K::URL_PATH_SEGMENT.to_owned(),
            namespace,
            name,
            event,
            object,
        });
        rv
    }

    /// Deletes an object (DELETED); `namespace` is `""` for a cluster-scoped kind.
    pub fn delete<K: k8s_openapi::Resource>(&self, namespace: &str, name: &str) {
        let mut state = self.lock();
        let key = (namespace.to_owned(), name.to_owned());
        let Some(mut object) = state
            .objects
            .get_mut(K::URL_PATH_SEGMENT)
            .and_then(|objects| objects.remove(&key))
        else {
            panic!(
                "delete of unknown {} {namespace}/{name}",
                K::URL_PATH_SEGMENT
            );
        };
        state.rv += 1;
        let rv = state.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.record(Change {
            rv,
            resource: K::URL_PATH_SEGMENT.to_owned(),
            namespace: key.0,
            name: key.1,
            event: "DELETED",
            object,
        });
    }

    /// The next `count` requests (list or watch) for `resource` fail with HTTP `code`.
    pub fn fail_next(&self, resource: &str, count: usize, code: u16) {
        let mut state = self.lock();
        let queue = state.failures.entry(resource.to_owned()).or_default();
        queue.extend(std::iter::repeat_n(code, count));
    }

    /// Holds LIST requests for `resource` until [`release_lists`](Self::release_lists).
    pub fn hold_lists(&self, resource: &str) {
        let (tx, _) = watch::channel(false);
        self.lock().gates.insert(resource.to_owned(), tx);
    }

    /// Answers held and future LIST requests for `resource`.
    pub fn release_lists(&self, resource: &str) {
        if let Some(gate) = self.lock().gates.remove(resource) {
            gate.send_replace(true);
        }
    }

    /// Sends `ERROR` 410 Gone on every open watch of `resource` and ends them; history up
    /// to now is compacted, so resuming from an old version is Gone too.
    pub fn expire_watches(&self, resource: &str) {
        let mut state = self.lock();
        let rv = state.rv;
        state.compacted.insert(resource.to_owned(), rv + 1);
        let gone = event_line("ERROR", &gone_status());
        state.watches.retain(|w| {
            if w.route.resource != resource {
                return true;
            }
            let _ = w.tx.send(gone.clone());
            false
        });
    }

    /// Ends every open watch of `resource`, as a server timeout or a dropped connection
    /// does; the watcher resumes from the last version it saw.
    pub fn close_watches(&self, resource: &str) {
        self.lock().watches.retain(|w| w.route.resource != resource);
    }

    /// `(lists, watches)` requested for `resource` so far.
    pub fn requests(&self, resource: &str) -> (usize, usize) {
        let state = self.lock();
        let of = |watch: bool| {
            state
                .requests
                .iter()
                .filter(|(r, w)| r == resource && *w == watch)
                .count()
        };
        (of(false), of(true))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn serve(self, uri: Uri) -> Response<FakeBody> {
        let Some(route) = Route::parse(&uri) else {
            return status_response(404, &format!("no route for {uri}"));
        };
        if !route.watch {
            // Held outside the lock: other resources keep being served.
            let gate = self
                .lock()
                .gates
                .get(&route.resource)
                .map(watch::Sender::subscribe);
            if let Some(mut gate) = gate {
                let _ = gate.wait_for(|open| *open).await;
            }
        }
        let mut state = self.lock();
        state.requests.push((route.resource.clone(), route.watch));
        let failure = state
            .failures
            .get_mut(&route.resource)
            .and_then(VecDeque::pop_front);
        if let Some(code) = failure {
            return status_response(code, "injected failure");
        }
        if route.watch {
            state.watch(route)
        } else {
            state.list(&route)
        }
    }
}

impl tower::Service<Request<kube::client::Body>> for FakeApi {
    type Response = Response<FakeBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        let api = self.clone();
        let uri = req.uri().clone();
        Box::pin(async move { Ok(api.serve(uri).await) })
    }
}

// === impl State ===

impl State {
    fn record(&mut self, change: Change) {
        let line = event_line(change.event, &change.object);
        self.watches
            .retain(|w| !w.route.matches(&change) || w.tx.send(line.clone()).is_ok());
        self.history.push(change);
    }

    fn list(&self, route: &Route) -> Response<FakeBody> {
        let items: Vec<&Value> = self
            .objects
            .get(&route.resource)
            .into_iter()
            .flatten()
            .filter(|((ns, name), _)| route.selects(ns, name))
            .map(|(_, object)| object)
            .collect();
        let list = json!({
            "kind": "List",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": items,
        });
        let (tx, body) = FakeBody::channel();
        let _ = tx.send(Bytes::from(list.to_string()));
        ok(body)
    }

    fn watch(&mut self, route: Route) -> Response<FakeBody> {
        let (tx, body) = FakeBody::channel();
        let from = route.resource_version.unwrap_or(self.rv);
        if from < self.compacted.get(&route.resource).copied().unwrap_or(0) {
            let _ = tx.send(event_line("ERROR", &gone_status()));
            return ok(body);
        }
        for change in self.history.iter().filter(|c| c.rv > from) {
            if route.matches(change) {
                let _ = tx.send(event_line(change.event, &change.object));
            }
        }
        self.watches.push(OpenWatch { route, tx });
        ok(body)
    }
}

// === impl Route ===

impl Route {
    /// `/api/v1[/namespaces/<ns>]/<plural>` or
    /// `/apis/<group>/<version>[/namespaces/<ns>]/<plural>`.
    fn parse(uri: &Uri) -> Option<Route> {
        let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
        let (["api", _version, rest @ ..] | ["apis", _, _version, rest @ ..]) = segments.as_slice()
        else {
            return None;
        };
        let (namespace, resource) = match rest {
            [resource] => (None, *resource),
            ["namespaces", ns, resource] => (Some((*ns).to_owned()), *resource),
            _ => return None,
        };
        let query: BTreeMap<String, String> = uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                Some((k.to_owned(), percent_decode(v)))
            })
            .collect();
        let name = query
            .get("fieldSelector")
            .and_then(|s| s.strip_prefix("metadata.name="))
            .map(str::to_owned);
        Some(Route {
            resource: resource.to_owned(),
            namespace,
            name,
            watch: query.get("watch").is_some_and(|w| w == "true"),
            resource_version: query.get("resourceVersion").and_then(|v| v.parse().ok()),
        })
    }

    fn selects(&self, namespace: &str, name: &str) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
            && self.name.as_deref().is_none_or(|n| n == name)
    }

    fn matches(&self, change: &Change) -> bool {
        self.resource == change.resource && self.selects(&change.namespace, &change.name)
    }
}

// === impl FakeBody ===

impl FakeBody {
    fn channel() -> (mpsc::UnboundedSender<Bytes>, FakeBody) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, FakeBody { rx })
    }
}

impl Body for FakeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn ok(body: FakeBody) -> Response<FakeBody> {
    let mut response = Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// An error response with a `Status` body, as the API server sends.
fn status_response(code: u16, message: &str) -> Response<FakeBody> {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": "InternalError", "code": code,
    });
    let (tx, body) = FakeBody::channel();
    let _ = tx.send(Bytes::from(status.to_string()));
    let mut response = ok(body);
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
}

fn gone_status() -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": "too old resource version", "reason": "Expired",
        "code": 410,
    })
}

/// One watch event, newline-terminated.
pub fn event_line(event: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": event, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
