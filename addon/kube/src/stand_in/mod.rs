//! A stand-in for the Kubernetes API server (feature `test-util`; never used by production
//! code). It is not a Kubernetes API server: it speaks the documented list/watch/CRUD wire
//! format of the Kubernetes API for the kinds Trellis uses (Namespaces, Services,
//! `discovery.k8s.io/v1` EndpointSlices, Pods, ConfigMaps, `coordination.k8s.io/v1` Leases,
//! `events.k8s.io/v1` Events, the `policy.trellis.dev/v1alpha1` AuthorizationPolicy custom
//! resource, the Gateway API's `gateway.networking.k8s.io/v1` HTTPRoute), over an
//! in-memory store, so the real kube-rs client (its
//! watcher, the leader elector, the Event recorder, the route status writer) runs against
//! it unchanged. There is no admission, no validation, no defaulting, no label selectors
//! and no PATCH.
//!
//! Two ways in:
//! - In process: [`ApiStandIn`] is a `tower::Service`; [`ApiStandIn::client`] is a
//!   `kube::Client` over it, with no network at all.
//! - Over HTTPS: [`ApiStandIn::serve_https`] listens on 127.0.0.1 with a fresh test CA and
//!   writes a kubeconfig ([`HttpsApi::write_kubeconfig`]), so another process (the real
//!   `trellis-addon run --kubernetes`) connects as it would to a cluster, bearer token
//!   and certificate verification included.
//!
//! What it answers:
//! - LIST `GET /api/v1/pods?limit=500`: every object of the resource (filtered by the
//!   path's namespace and a `metadata.name=` field selector), with the list's
//!   `resourceVersion`.
//! - WATCH `GET ...?watch=true&resourceVersion=N`: a streaming body (chunked over HTTP/1.1)
//!   of newline-delimited `{"type":"ADDED|MODIFIED|DELETED|ERROR","object":...}` events:
//!   first every recorded change after `N`, then changes as they happen. A version older
//!   than the last [`ApiStandIn::expire_watches`] gets `ERROR` 410 Gone, as from a
//!   compacted etcd.
//! - GET `.../<resource>/<name>`: the object, or 404 NotFound.
//! - POST `.../<resource>`: creates the object from the body (its `uid` is `uid-<rv>`),
//!   201; 409 AlreadyExists if the name is taken.
//! - GET `/version`: a `version.Info`, v1.33.0 unless [`ApiStandIn::set_version`] says
//!   otherwise.
//! - Anything a test registered with [`ApiStandIn::handle`] (exact method and path):
//!   that test's answer, for what the store does not model.
//! - PUT `.../<resource>/<name>`: replaces the object; 409 Conflict when the body's
//!   `resourceVersion` is not the stored one, 404 when there is none. Every POST and PUT
//!   is recorded with its body and answer ([`ApiStandIn::writes`]).
//! - The `status` subresource of the kinds that have one (HTTPRoutes, as their CRD
//!   declares): GET `.../<resource>/<name>/status` answers the object; PUT there changes
//!   its `status` only (whatever else the body says), with the same 409 and 404 as a PUT
//!   of the object. For these kinds, as on a real API server, a write of the object itself
//!   (POST, PUT, and a test's [`ApiStandIn::apply`]) cannot change `status` (a create
//!   starts without one, a replace keeps the stored one), and `metadata.generation` is 1
//!   on create and goes up by one whenever anything but `metadata` and `status` changes.
//!   Tests write a status as another controller would with [`ApiStandIn::set_status`].
//!   Any other subresource is 404.
//!
//! - Every request for a resource marked [`ApiStandIn::unserve`]: 404 with the plain-text
//!   body `404 page not found`, as the API server answers for a custom resource whose CRD
//!   is not installed. By default every resource is served (as if every CRD were
//!   installed).
//!
//! Every write bumps one global resource version, as in etcd. Tests change the cluster
//! with [`ApiStandIn::apply`] (k8s-openapi types) or [`ApiStandIn::apply_json`] (JSON with
//! `kind`), and inject failures: HTTP errors for the next requests of a resource (or all of
//! them, for an outage), 410 Gone on open watches, closed watches, requests held back until
//! released, and another client's write landing just before the next write of a resource.

mod https;

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::{Body, Frame};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

pub use https::{HttpsApi, TOKEN};

/// The stand-in API server; clones share one store.
#[derive(Clone, Default)]
pub struct ApiStandIn {
    state: Arc<Mutex<State>>,
}

/// A response body fed from a channel: whole for a LIST, open-ended for a WATCH.
pub struct StandInBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
}

/// A POST or PUT the server received, and its answer.
#[derive(Clone, Debug)]
pub struct Write {
    /// `POST` or `PUT`.
    pub method: Method,
    /// The resource (URL plural), e.g. `leases`.
    pub resource: String,
    /// The subresource written, e.g. `status`; `None` for the object itself.
    pub subresource: Option<String>,
    /// The path's namespace.
    pub namespace: Option<String>,
    /// HTTP status of the answer.
    pub code: u16,
    /// The request body, as JSON.
    pub body: Value,
}

/// An object [`ApiStandIn::apply_json`] cannot store: no `kind`, a kind the stand-in does
/// not serve, or no `metadata.name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotStorable(String);

/// A test's answer to requests the store does not model ([`ApiStandIn::handle`]): the
/// request's URI and body in, `(status, body)` out; a JSON string is sent as plain text.
type Handler = Arc<dyn Fn(&Uri, &Bytes) -> (u16, Value) + Send + Sync>;

#[derive(Default)]
struct State {
    /// The `GET /version` answer ([`ApiStandIn::set_version`]); 1.33.0 when unset.
    version: Option<Value>,
    /// Answers for exact `(method, path)` pairs, tried before the store.
    handlers: BTreeMap<(Method, String), Handler>,
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
    /// Per resource: the status code of every request while it is out.
    outages: BTreeMap<String, u16>,
    /// Per resource: `false` while requests other than watches are held back.
    gates: BTreeMap<String, watch::Sender<bool>>,
    /// Per resource: objects stored, as by another client, just before its next writes
    /// (one per write).
    interpose: BTreeMap<String, VecDeque<Value>>,
    /// `(resource, is_collection_get, is_watch)` of every request, in order.
    requests: Vec<(String, bool, bool)>,
    /// Every POST and PUT, in order.
    writes: Vec<Write>,
    /// Resources answered 404, as without their CRD ([`ApiStandIn::unserve`]).
    unserved: std::collections::BTreeSet<String>,
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
    /// The path's object name, for a GET or PUT of one object.
    object: Option<String>,
    /// The path's subresource (`status`), after the object name.
    subresource: Option<String>,
    /// From a `metadata.name=` field selector.
    name: Option<String>,
    watch: bool,
    resource_version: Option<u64>,
}

/// The resource (URL plural) of each kind the stand-in serves.
const KINDS: [(&str, &str); 14] = [
    ("Namespace", "namespaces"),
    ("Service", "services"),
    ("EndpointSlice", "endpointslices"),
    ("Pod", "pods"),
    ("ConfigMap", "configmaps"),
    ("Lease", "leases"),
    ("Event", "events"),
    ("Deployment", "deployments"),
    (
        "MutatingWebhookConfiguration",
        "mutatingwebhookconfigurations",
    ),
    (
        "ValidatingWebhookConfiguration",
        "validatingwebhookconfigurations",
    ),
    ("CustomResourceDefinition", "customresourcedefinitions"),
    ("ServiceAccount", "serviceaccounts"),
    ("AuthorizationPolicy", "authorizationpolicies"),
    ("HTTPRoute", "httproutes"),
];

/// The resources (URL plural) with a `status` subresource: writes of the object leave
/// `status` alone and count `metadata.generation`.
const WITH_STATUS: [&str; 1] = ["httproutes"];

/// The resource (URL plural) the stand-in stores objects of `kind` under, e.g. `pods` for
/// `Pod`; `None` for a kind it does not serve.
pub fn resource_of(kind: &str) -> Option<&'static str> {
    KINDS.iter().find(|(k, _)| *k == kind).map(|(_, r)| *r)
}

// === impl ApiStandIn ===

impl ApiStandIn {
    /// A client of this server, in process (no network), as the code under test gets it.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.clone(), "default")
    }

    /// Creates or replaces `obj` (ADDED or MODIFIED), returning its resource version.
    pub fn apply<K: k8s_openapi::Resource + Serialize>(&self, obj: &K) -> u64 {
        let object = serde_json::to_value(obj).unwrap_or_default();
        self.lock().apply(K::URL_PATH_SEGMENT, object)
    }

    /// Creates or replaces an object given as JSON (ADDED or MODIFIED), stored under the
    /// resource of its `kind` ([`resource_of`]); returns its resource version. A new
    /// object without `metadata.uid` gets one (`uid-<rv>`), a replaced one keeps its uid,
    /// as the API server does.
    pub fn apply_json(&self, object: Value) -> Result<u64, NotStorable> {
        let kind = object["kind"].as_str().unwrap_or_default();
        let Some(resource) = resource_of(kind) else {
            return Err(NotStorable(format!(
                "kind {kind:?} is not served (known: {})",
                KINDS.map(|(k, _)| k).join(", ")
            )));
        };
        if object["metadata"]["name"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            return Err(NotStorable(format!("a {kind} without metadata.name")));
        }
        Ok(self.lock().apply(resource, object))
    }

    /// Deletes an object (DELETED); `namespace` is `""` for a cluster-scoped kind.
    ///
    /// # Panics
    ///
    /// When there is no such object: a test deleting what it never created is wrong.
    pub fn delete<K: k8s_openapi::Resource>(&self, namespace: &str, name: &str) {
        if self.remove(K::URL_PATH_SEGMENT, namespace, name).is_none() {
            panic!(
                "delete of unknown {} {namespace}/{name}",
                K::URL_PATH_SEGMENT
            );
        }
    }

    /// Deletes an object of `resource` (URL plural) (DELETED); returns it as it was, or
    /// `None` when there is none. `namespace` is `""` for a cluster-scoped kind.
    pub fn remove(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let mut state = self.lock();
        let key = (namespace.to_owned(), name.to_owned());
        let mut object = state.objects.get_mut(resource)?.remove(&key)?;
        state.rv += 1;
        let rv = state.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.record(Change {
            rv,
            resource: resource.to_owned(),
            namespace: key.0,
            name: key.1,
            event: "DELETED",
            object: object.clone(),
        });
        Some(object)
    }

    /// The next `count` requests (of any kind) for `resource` fail with HTTP `code`.
    pub fn fail_next(&self, resource: &str, count: usize, code: u16) {
        let mut state = self.lock();
        let queue = state.failures.entry(resource.to_owned()).or_default();
        queue.extend(std::iter::repeat_n(code, count));
    }

    /// Every request for `resource` fails with HTTP `code` from now on (`None`: until now).
    pub fn outage(&self, resource: &str, code: Option<u16>) {
        let mut state = self.lock();
        match code {
            Some(code) => state.outages.insert(resource.to_owned(), code),
            None => state.outages.remove(resource),
        };
    }

    /// While `unserved`, every request for `resource` (URL plural) gets 404 with the
    /// plain-text body `404 page not found`, as the API server answers for a custom
    /// resource whose CRD is not installed; `false` serves it again (the CRD applied).
    /// Stored objects are kept either way.
    pub fn unserve(&self, resource: &str, unserved: bool) {
        let mut state = self.lock();
        if unserved {
            state.unserved.insert(resource.to_owned());
        } else {
            state.unserved.remove(resource);
        }
    }

    /// Just before the next POST or PUT of a `K` (after those already interposed), stores
    /// `obj` as another client would (bumping its resource version), so that write loses
    /// the race.
    pub fn interpose_next_write<K: k8s_openapi::Resource + Serialize>(&self, obj: &K) {
        let object = serde_json::to_value(obj).unwrap_or_default();
        self.lock()
            .interpose
            .entry(K::URL_PATH_SEGMENT.to_owned())
            .or_default()
            .push_back(object);
    }

    /// Like [`interpose_next_write`](Self::interpose_next_write), for an object given as
    /// JSON with its `kind` (a custom resource, say): stored as is, just before the next
    /// POST or PUT of its resource (its subresources included).
    pub fn interpose_next_write_json(&self, object: Value) -> Result<(), NotStorable> {
        let kind = object["kind"].as_str().unwrap_or_default();
        let Some(resource) = resource_of(kind) else {
            return Err(NotStorable(format!("kind {kind:?} is not served")));
        };
        let mut state = self.lock();
        let queue = state.interpose.entry(resource.to_owned()).or_default();
        queue.push_back(object);
        Ok(())
    }

    /// Replaces the `status` of a stored object of `resource` (URL plural), as another
    /// controller's unconditional PUT of the `status` subresource would (`Value::Null`
    /// removes it); returns the new resource version, or `None` when there is no such
    /// object. Not recorded in [`writes`](Self::writes), which are the code under test's.
    pub fn set_status(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        status: Value,
    ) -> Option<u64> {
        let mut state = self.lock();
        let key = (namespace.to_owned(), name.to_owned());
        let mut object = state.objects.get(resource)?.get(&key)?.clone();
        set_status(&mut object, status);
        state.store(resource, object);
        Some(state.rv)
    }

    /// The stored object, if any.
    pub fn object<K: k8s_openapi::Resource>(&self, namespace: &str, name: &str) -> Option<Value> {
        self.get(K::URL_PATH_SEGMENT, namespace, name)
    }

    /// The stored object of `resource` (URL plural), if any; `namespace` is `""` for a
    /// cluster-scoped kind.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(resource)?
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every POST and PUT for `resource` so far, in order.
    pub fn writes(&self, resource: &str) -> Vec<Write> {
        let state = self.lock();
        let writes = state.writes.iter().filter(|w| w.resource == resource);
        writes.cloned().collect()
    }

    /// Holds LIST requests (and any other request but a watch) for `resource` until
    /// [`release_lists`](Self::release_lists).
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
                .filter(|(r, list, w)| r == resource && *list && *w == watch)
                .count()
        };
        (of(false), of(true))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets what `GET /version` answers: `git_version` like `v1.28.3`, from which
    /// `major` and `minor` are taken.
    pub fn set_version(&self, git_version: &str) {
        let trimmed = git_version.trim_start_matches('v');
        let mut parts = trimmed.split('.');
        let major = parts.next().unwrap_or_default().to_owned();
        let minor = parts.next().unwrap_or_default().to_owned();
        self.lock().version = Some(version_info(&major, &minor, git_version));
    }

    /// Answers every `method` request to exactly `path` (no query) with `f`, before the
    /// store is consulted: for what the stand-in does not model, such as
    /// `SelfSubjectAccessReview`s, a pod's `proxy` subresource, or a dry-run create that
    /// would pass through admission webhooks. A `Value::String` answer is sent as
    /// `text/plain`, anything else as JSON.
    pub fn handle(
        &self,
        method: Method,
        path: &str,
        f: impl Fn(&Uri, &Bytes) -> (u16, Value) + Send + Sync + 'static,
    ) {
        self.lock()
            .handlers
            .insert((method, path.to_owned()), Arc::new(f));
    }

    /// Answers one request; shared by the in-process service and the HTTPS front.
    async fn serve(self, method: Method, uri: Uri, body: Bytes) -> Response<StandInBody> {
        if method == Method::GET && uri.path() == "/version" {
            let version =
                (self.lock().version.clone()).unwrap_or_else(|| version_info("1", "33", "v1.33.0"));
            return object_response(200, &version);
        }
        let handler = (self.lock().handlers)
            .get(&(method.clone(), uri.path().to_owned()))
            .cloned();
        if let Some(handler) = handler {
            let (code, value) = handler(&uri, &body);
            return match value {
                // A text answer (a pod's `/metrics` through the proxy subresource).
                Value::String(text) => text_response(code, text),
                value => object_response(code, &value),
            };
        }
        let Some(route) = Route::parse(&uri) else {
            return status_response(404, "NotFound", &format!("no route for {uri}"));
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
        let collection_get = method == Method::GET && route.object.is_none();
        state
            .requests
            .push((route.resource.clone(), collection_get, route.watch));
        if state.unserved.contains(&route.resource) {
            return text_response(404, "404 page not found\n".to_owned());
        }
        let failure = state
            .failures
            .get_mut(&route.resource)
            .and_then(VecDeque::pop_front)
            .or_else(|| state.outages.get(&route.resource).copied());
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let is_write = method == Method::POST || method == Method::PUT;
        let (code, response) = match failure {
            Some(code) => (
                code,
                status_response(code, "InternalError", "injected failure"),
            ),
            None => {
                let other = (state.interpose.get_mut(&route.resource))
                    .filter(|_| is_write)
                    .and_then(VecDeque::pop_front);
                if let Some(other) = other {
                    state.store(&route.resource, other);
                }
                state.answer(&method, route.clone(), &body)
            }
        };
        if is_write {
            state.writes.push(Write {
                method,
                resource: route.resource,
                subresource: route.subresource,
                namespace: route.namespace,
                code,
                body,
            });
        }
        response
    }
}

impl fmt::Debug for ApiStandIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("ApiStandIn")
            .field("resource_version", &state.rv)
            .field("watches", &state.watches.len())
            .finish_non_exhaustive()
    }
}

impl tower::Service<Request<kube::client::Body>> for ApiStandIn {
    type Response = Response<StandInBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        let api = self.clone();
        let (parts, body) = req.into_parts();
        Box::pin(async move { Ok(api.serve(parts.method, parts.uri, read(body).await).await) })
    }
}

// === impl State ===

impl State {
    /// Answers a request that is not failed: `(status code, response)`.
    fn answer(
        &mut self,
        method: &Method,
        route: Route,
        body: &Value,
    ) -> (u16, Response<StandInBody>) {
        let not_allowed = || (405, status_response(405, "MethodNotAllowed", "not served"));
        if let Some(sub) = &route.subresource {
            let status = sub == "status" && WITH_STATUS.contains(&route.resource.as_str());
            return match (method.as_str(), route.object.clone()) {
                _ if !status => (
                    404,
                    status_response(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    ),
                ),
                ("GET", Some(name)) => self.get_one(&route, &name),
                ("PUT", Some(name)) => self.replace_status(&route, &name, body),
                _ => not_allowed(),
            };
        }
        match (method.as_str(), route.object.clone()) {
            ("GET", None) if route.watch => (200, self.watch(route)),
            ("GET", None) => (200, self.list(&route)),
            ("GET", Some(name)) => self.get_one(&route, &name),
            ("POST", None) => self.create(&route, body.clone()),
            ("PUT", Some(name)) => self.replace(&route, &name, body.clone()),
            _ => not_allowed(),
        }
    }

    fn get_one(&self, route: &Route, name: &str) -> (u16, Response<StandInBody>) {
        let key = (route.namespace.clone().unwrap_or_default(), name.to_owned());
        match self.objects.get(&route.resource).and_then(|o| o.get(&key)) {
            Some(object) => (200, object_response(200, object)),
            None => (
                404,
                status_response(404, "NotFound", &format!("{name} not found")),
            ),
        }
    }

    fn create(&mut self, route: &Route, mut object: Value) -> (u16, Response<StandInBody>) {
        if let Some(ns) = &route.namespace {
            object["metadata"]["namespace"] = json!(ns);
        }
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let key = (route.namespace.clone().unwrap_or_default(), name.clone());
        let exists = self
            .objects
            .get(&route.resource)
            .is_some_and(|o| o.contains_key(&key));
        if exists {
            let message = format!("{} {name:?} already exists", route.resource);
            return (409, status_response(409, "AlreadyExists", &message));
        }
        object["metadata"]["uid"] = json!(format!("uid-{}", self.rv + 1));
        let object = object_write(&route.resource, None, object);
        let stored = self.store(&route.resource, object);
        (201, object_response(201, &stored))
    }

    fn replace(
        &mut self,
        route: &Route,
        name: &str,
        object: Value,
    ) -> (u16, Response<StandInBody>) {
        let current = match self.current_for_update(route, name, &object) {
            Ok(current) => current,
            Err((code, reason, message)) => return (code, status_response(code, reason, &message)),
        };
        let object = object_write(&route.resource, Some(current), object);
        let stored = self.store(&route.resource, object);
        (200, object_response(200, &stored))
    }

    /// The stored object an update of `name` (with `body`) replaces, or the API server's
    /// refusal: 404 when there is none, 409 when `body` names another resourceVersion.
    fn current_for_update(
        &self,
        route: &Route,
        name: &str,
        body: &Value,
    ) -> Result<&Value, (u16, &'static str, String)> {
        let key = (route.namespace.clone().unwrap_or_default(), name.to_owned());
        let Some(current) = self.objects.get(&route.resource).and_then(|o| o.get(&key)) else {
            return Err((404, "NotFound", format!("{name} not found")));
        };
        let sent = &body["metadata"]["resourceVersion"];
        if !sent.is_null() && *sent != current["metadata"]["resourceVersion"] {
            let message = format!("the object has been modified; sent version {sent}");
            return Err((409, "Conflict", message));
        }
        Ok(current)
    }

    /// PUT of the `status` subresource: only the body's `status` is taken.
    fn replace_status(
        &mut self,
        route: &Route,
        name: &str,
        body: &Value,
    ) -> (u16, Response<StandInBody>) {
        let current = match self.current_for_update(route, name, body) {
            Ok(current) => current,
            Err((code, reason, message)) => return (code, status_response(code, reason, &message)),
        };
        let mut object = current.clone();
        set_status(&mut object, body["status"].clone());
        let stored = self.store(&route.resource, object);
        (200, object_response(200, &stored))
    }

    /// Stores `object` as a test's apply: a uid for a new object that has none, the stored
    /// uid kept for a replaced one; a write of the object itself ([`object_write`]: the
    /// stored `status` kept, `metadata.generation` counted). Returns the new resource
    /// version.
    fn apply(&mut self, resource: &str, mut object: Value) -> u64 {
        let key = (
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        let stored = self.objects.get(resource).and_then(|o| o.get(&key));
        if object["metadata"]["uid"].is_null() {
            let uid = match stored {
                Some(stored) => stored["metadata"]["uid"].clone(),
                None => json!(format!("uid-{}", self.rv + 1)),
            };
            if !uid.is_null() {
                object["metadata"]["uid"] = uid;
            }
        }
        let object = object_write(resource, stored, object);
        self.store(resource, object);
        self.rv
    }

    /// Stores `object` at a new resource version and records the change; returns it as
    /// stored.
    fn store(&mut self, resource: &str, mut object: Value) -> Value {
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        self.rv += 1;
        let rv = self.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let previous = self
            .objects
            .entry(resource.to_owned())
            .or_default()
            .insert((namespace.clone(), name.clone()), object.clone());
        let event = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record(Change {
            rv,
            resource: resource.to_owned(),
            namespace,
            name,
            event,
            object: object.clone(),
        });
        object
    }

    fn record(&mut self, change: Change) {
        let line = event_line(change.event, &change.object);
        self.watches
            .retain(|w| !w.route.matches(&change) || w.tx.send(line.clone()).is_ok());
        self.history.push(change);
    }

    fn list(&self, route: &Route) -> Response<StandInBody> {
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
        let (tx, body) = StandInBody::channel();
        let _ = tx.send(Bytes::from(list.to_string()));
        ok(body)
    }

    fn watch(&mut self, route: Route) -> Response<StandInBody> {
        let (tx, body) = StandInBody::channel();
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
    /// `/api/v1[/namespaces/<ns>]/<plural>[/<name>[/<subresource>]]` or
    /// `/apis/<group>/<version>[/namespaces/<ns>]/<plural>[/<name>[/<subresource>]]`.
    fn parse(uri: &Uri) -> Option<Route> {
        let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
        let (["api", _version, rest @ ..] | ["apis", _, _version, rest @ ..]) = segments.as_slice()
        else {
            return None;
        };
        // `namespaces/<name>` alone is a Namespace; followed by more, a namespace's path.
        let (namespace, rest) = match rest {
            ["namespaces", ns, more @ ..] if !more.is_empty() => (Some((*ns).to_owned()), more),
            _ => (None, rest),
        };
        let own = |s: &&str| (*s).to_owned();
        let (resource, object, subresource) = match rest {
            [resource] => (*resource, None, None),
            [resource, name] => (*resource, Some(own(name)), None),
            [resource, name, sub] => (*resource, Some(own(name)), Some(own(sub))),
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
            object,
            subresource,
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

// === impl StandInBody ===

impl StandInBody {
    fn channel() -> (mpsc::UnboundedSender<Bytes>, StandInBody) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, StandInBody { rx })
    }
}

impl Body for StandInBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

impl fmt::Debug for StandInBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StandInBody").finish_non_exhaustive()
    }
}

// === impl NotStorable ===

impl fmt::Display for NotStorable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the API stand-in cannot store this object: {}", self.0)
    }
}

impl std::error::Error for NotStorable {}

/// A request body, whole; a body that fails part-way counts as ended there (the request
/// then fails to parse as JSON, as it would on a real server).
async fn read<B: Body<Data = Bytes>>(body: B) -> Bytes {
    let mut body = std::pin::pin!(body);
    let mut bytes = Vec::new();
    while let Some(Ok(frame)) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        if let Ok(data) = frame.into_data() {
            bytes.extend_from_slice(&data);
        }
    }
    Bytes::from(bytes)
}

fn ok(body: StandInBody) -> Response<StandInBody> {
    let mut response = Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// An error response with a `Status` body, as the API server sends.
fn status_response(code: u16, reason: &str, message: &str) -> Response<StandInBody> {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    object_response(code, &status)
}

/// `object` as the whole body, with HTTP status `code`.
fn object_response(code: u16, object: &Value) -> Response<StandInBody> {
    let (tx, body) = StandInBody::channel();
    let _ = tx.send(Bytes::from(object.to_string()));
    let mut response = ok(body);
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
}

/// `text` as a `text/plain` body, with HTTP status `code`.
fn text_response(code: u16, text: String) -> Response<StandInBody> {
    let (tx, body) = StandInBody::channel();
    let _ = tx.send(Bytes::from(text));
    let mut response = Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// A `version.Info` as `GET /version` returns it.
fn version_info(major: &str, minor: &str, git_version: &str) -> Value {
    json!({
        "major": major, "minor": minor, "gitVersion": git_version,
        "gitCommit": "stand-in", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64",
    })
}

/// `object` as a write of the object itself (not of its `status` subresource) stores it,
/// given what is `stored`: unchanged for a resource without a status subresource; for one
/// with ([`WITH_STATUS`]), `status` is the stored one (none on create) and
/// `metadata.generation` is 1 on create, and goes up by one when anything but `metadata`
/// and `status` changed.
fn object_write(resource: &str, stored: Option<&Value>, mut object: Value) -> Value {
    if !WITH_STATUS.contains(&resource) {
        return object;
    }
    let status = stored.map(|s| s["status"].clone()).unwrap_or(Value::Null);
    set_status(&mut object, status);
    let generation = match stored {
        None => 1,
        Some(stored) => {
            let before = stored["metadata"]["generation"].as_i64().unwrap_or(0);
            if content(stored) == content(&object) {
                before.max(1)
            } else {
                before + 1
            }
        }
    };
    object["metadata"]["generation"] = json!(generation);
    object
}

/// Everything of an object but `metadata` and `status`: what `metadata.generation` counts.
fn content(object: &Value) -> Value {
    let mut content = object.clone();
    if let Some(fields) = content.as_object_mut() {
        fields.remove("metadata");
        fields.remove("status");
    }
    content
}

/// Sets `object`'s `status`; `Value::Null` removes it.
fn set_status(object: &mut Value, status: Value) {
    if let Some(fields) = object.as_object_mut() {
        if status.is_null() {
            fields.remove("status");
        } else {
            fields.insert("status".to_owned(), status);
        }
    }
}

fn gone_status() -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": "too old resource version", "reason": "Expired",
        "code": 410,
    })
}

/// One watch event as the API server streams it: `{"type": event, "object": object}`,
/// newline-terminated.
pub fn event_line(event: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": event, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
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
