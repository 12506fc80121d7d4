//! Reading a directory of YAML into validated [`Objects`].
//!
//! The directory is read non-recursively: every regular file (or symlink to one) named
//! `*.yaml` or `*.yml`, in byte order of name. Hidden files (leading `.`) and everything
//! else are ignored, which also skips editor lock files and the `..data` links of a
//! mounted ConfigMap. Each file may hold several documents separated by `---`; empty
//! documents are skipped but still counted, so document numbers match what a reader sees.
//!
//! Reading and parsing are separate steps so that the watcher can digest exactly the bytes
//! it parses and skip parsing when nothing changed.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;

use crate::error::{ConfigError, Position, Problem};
use crate::httproute::HTTP_ROUTE_KIND;
use crate::objects::{
    HTTP_ROUTE_API_VERSION, IntOrString, ObjectKey, Objects, POLICY_API_VERSION, Policy,
    PolicyDocument, Route, RouteDocument, SERVICE_API_VERSION, Service, ServiceDocument,
    WORKLOAD_API_VERSION, Workload, WorkloadDocument,
};
use crate::translate::selects;
use crate::validate::{self, FieldError};

/// Largest file read; bigger files are refused rather than parsed.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Most documents accepted in one file.
pub const MAX_DOCUMENTS: usize = 1024;
/// Most YAML files accepted in one directory.
pub const MAX_FILES: usize = 256;

/// Reads every YAML file in `dir` and validates the objects they hold.
///
/// Returns every problem found across all files, not just the first.
pub fn load_dir(dir: &Path) -> Result<Objects, ConfigError> {
    read_dir(dir).parse()
}

/// The raw state of a directory: the text of each YAML file and a digest over names and
/// contents (and read failures, so that a failure that changes is noticed too).
pub(crate) struct DirContents {
    pub(crate) digest: u64,
    files: Vec<SourceFile>,
    problems: Vec<Problem>,
}

struct SourceFile {
    path: PathBuf,
    text: String,
}

/// Where an object was read from, to name both sides of a conflict.
#[derive(Clone)]
struct Origin {
    file: PathBuf,
    document: usize,
}

/// Accumulates objects and problems across files and documents.
#[derive(Default)]
struct Loader {
    objects: Objects,
    problems: Vec<Problem>,
    origins: HashMap<(&'static str, ObjectKey), Origin>,
    /// Who holds each address, to name both sides of a shared one. IPs are canonical, so
    /// `::ffff:10.0.0.1` and `10.0.0.1` collide as the proxy's lookup would make them.
    mesh_addresses: HashMap<SocketAddr, (ObjectKey, Origin)>,
    pod_addresses: HashMap<IpAddr, (ObjectKey, Origin)>,
    service_addresses: HashMap<IpAddr, (ObjectKey, Origin)>,
}

/// One document being loaded: its location and, once known, its `kind ns/name`.
struct Doc<'a> {
    file: &'a Path,
    document: usize,
    object: Option<String>,
}

/// Reads the YAML files of `dir`, recording (not returning) failures.
pub(crate) fn read_dir(dir: &Path) -> DirContents {
    let mut contents = DirContents {
        digest: 0,
        files: Vec::new(),
        problems: Vec::new(),
    };
    let mut hasher = DefaultHasher::new();
    let names = match yaml_file_names(dir) {
        Ok(names) => names,
        Err(message) => {
            contents.problems.push(Problem::new(dir, message));
            Vec::new()
        }
    };
    if names.len() > MAX_FILES {
        contents.problems.push(Problem::new(
            dir,
            format!(
                "holds {} YAML files; at most {MAX_FILES} are accepted",
                names.len()
            ),
        ));
    } else {
        for name in names {
            let path = dir.join(&name);
            name.hash(&mut hasher);
            match read_file(&path) {
                Ok(bytes) => {
                    bytes.hash(&mut hasher);
                    match String::from_utf8(bytes) {
                        Ok(text) => contents.files.push(SourceFile { path, text }),
                        Err(_) => {
                            contents
                                .problems
                                .push(Problem::new(&path, "file is not UTF-8"));
                        }
                    }
                }
                Err(message) => contents.problems.push(Problem::new(&path, message)),
            }
        }
    }
    for problem in &contents.problems {
        problem.to_string().hash(&mut hasher);
    }
    contents.digest = hasher.finish();
    contents
}

/// Names of the candidate files in `dir`, sorted.
fn yaml_file_names(dir: &Path) -> Result<Vec<OsString>, String> {
    let unreadable = |e: std::io::Error| format!("cannot read directory: {e}");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(unreadable)? {
        let name = entry.map_err(unreadable)?.file_name();
        let text = name.to_string_lossy();
        let is_yaml = text.ends_with(".yaml") || text.ends_with(".yml");
        if !is_yaml || text.starts_with('.') {
            continue;
        }
        // Follows symlinks; a dangling one is read (and reported) rather than skipped.
        if std::fs::metadata(dir.join(&name)).is_ok_and(|m| !m.is_file()) {
            continue;
        }
        names.push(name);
    }
    names.sort();
    Ok(names)
}

/// Reads at most [`MAX_FILE_BYTES`] (+1, to detect more).
fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read file: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read file: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("file is larger than {MAX_FILE_BYTES} bytes"));
    }
    Ok(bytes)
}

// === impl DirContents ===

impl DirContents {
    /// Parses and validates every file, returning the objects or every problem.
    pub(crate) fn parse(&self) -> Result<Objects, ConfigError> {
        let mut loader = Loader {
            problems: self.problems.clone(),
            ..Loader::default()
        };
        for file in &self.files {
            loader.file(&file.path, &file.text);
        }
        // Needs every object: a Service and the Workloads it selects may be in any file.
        loader.named_target_ports();
        match ConfigError::from_problems(loader.problems) {
            Some(error) => Err(error),
            None => Ok(loader.objects),
        }
    }
}

// === impl Origin ===

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {})", self.file.display(), self.document)
    }
}

// === impl Loader ===

impl Loader {
    fn file(&mut self, path: &Path, text: &str) {
        for (index, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let mut doc = Doc {
                file: path,
                document: index + 1,
                object: None,
            };
            if doc.document > MAX_DOCUMENTS {
                self.problems.push(Problem::new(
                    path,
                    format!("holds more than {MAX_DOCUMENTS} documents"),
                ));
                return;
            }
            let value = match Value::deserialize(de) {
                Ok(value) => value,
                Err(e) => {
                    let mut problem = doc.problem(None, format!("invalid YAML: {e}"));
                    problem.position = e.location().map(|l| Position {
                        line: l.line(),
                        column: l.column(),
                    });
                    self.problems.push(problem);
                    // Past a syntax error the parser cannot find the next document.
                    return;
                }
            };
            self.document(&mut doc, value);
        }
    }

    fn document(&mut self, doc: &mut Doc<'_>, value: Value) {
        if value.is_null() {
            return;
        }
        if !value.is_mapping() {
            let problem = doc.problem(
                None,
                "expected a mapping with apiVersion, kind and metadata",
            );
            self.problems.push(problem);
            return;
        }
        let api_version = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let meta = value.get("metadata");
        let name = meta
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("?");
        let namespace = meta
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        match (api_version, kind) {
            (SERVICE_API_VERSION, "Service") => {
                doc.object = Some(format!("Service {namespace}/{name}"));
                if let Some(svc) = self.typed::<ServiceDocument>(doc, value) {
                    let svc = Service::from(svc);
                    self.field_errors(doc, validate::service(&svc));
                    self.unique_service_addresses(&svc, doc);
                    if self.first_definition("Service", svc.metadata.key(), doc) {
                        self.objects.services.insert(svc.metadata.key(), svc);
                    }
                }
            }
            (WORKLOAD_API_VERSION, "Workload") => {
                doc.object = Some(format!("Workload {namespace}/{name}"));
                if let Some(w) = self.typed::<WorkloadDocument>(doc, value) {
                    let w = Workload::from(w);
                    self.field_errors(doc, validate::workload(&w));
                    self.unique_address(&w, doc);
                    if self.first_definition("Workload", w.metadata.key(), doc) {
                        self.objects.workloads.insert(w.metadata.key(), w);
                    }
                }
            }
            (POLICY_API_VERSION, "AuthorizationPolicy") => {
                doc.object = Some(format!("AuthorizationPolicy {namespace}/{name}"));
                if let Some(p) = self.typed::<PolicyDocument>(doc, value) {
                    let p = Policy::from(p);
                    self.field_errors(doc, crate::authorization::problems(&p));
                    if self.first_definition("AuthorizationPolicy", p.metadata.key(), doc) {
                        self.objects.policies.insert(p.metadata.key(), p);
                    }
                }
            }
            (HTTP_ROUTE_API_VERSION, HTTP_ROUTE_KIND) => {
                doc.object = Some(format!("{HTTP_ROUTE_KIND} {namespace}/{name}"));
                if let Some(r) = self.typed::<RouteDocument>(doc, value) {
                    let r = Route::from(r);
                    // A Gateway's route is not the mesh's: ignored, whatever it holds.
                    if r.is_mesh() {
                        self.field_errors(doc, crate::routes::problems(&r));
                        if self.first_definition(HTTP_ROUTE_KIND, r.metadata.key(), doc) {
                            self.objects.routes.insert(r.metadata.key(), r);
                        }
                    }
                }
            }
            _ => {
                let what = if kind.is_empty() || api_version.is_empty() {
                    "missing kind or apiVersion".to_owned()
                } else {
                    format!("unsupported kind {kind:?} (apiVersion {api_version:?})")
                };
                let message = format!(
                    "{what}: supported kinds are Service ({SERVICE_API_VERSION}), Workload \
                     ({WORKLOAD_API_VERSION}), AuthorizationPolicy ({POLICY_API_VERSION}) and \
                     {HTTP_ROUTE_KIND} ({HTTP_ROUTE_API_VERSION})"
                );
                self.problems.push(doc.problem(None, message));
            }
        }
    }

    /// Deserializes `value` as `T`, recording the failing field's path on error.
    fn typed<T: serde::de::DeserializeOwned>(&mut self, doc: &Doc<'_>, value: Value) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(typed) => Some(typed),
            Err(e) => {
                let path = e.path().to_string();
                let field = (path != ".").then_some(path);
                let problem = doc.problem(field, e.into_inner().to_string());
                self.problems.push(problem);
                None
            }
        }
    }

    fn field_errors(&mut self, doc: &Doc<'_>, errors: Vec<FieldError>) {
        for FieldError { field, message } in errors {
            self.problems.push(doc.problem(Some(field), message));
        }
    }

    /// Records where `key` was defined; false (and a problem naming both places) if it
    /// already was.
    fn first_definition(&mut self, kind: &'static str, key: ObjectKey, doc: &Doc<'_>) -> bool {
        let here = doc.origin();
        match self.origins.get(&(kind, key.clone())) {
            Some(first) => {
                // The problem names the object already, so the message only says where.
                let message = format!("defined twice: in {first} and in {here}");
                self.problems.push(doc.problem(None, message));
                false
            }
            None => {
                self.origins.insert((kind, key), here);
                true
            }
        }
    }

    /// Two proxies cannot listen on one address, and two pods cannot have one IP, so a
    /// shared meshAddress or address is a mistake.
    fn unique_address(&mut self, w: &Workload, doc: &Doc<'_>) {
        let key = w.metadata.key();
        if let Some(addr) = w.spec.mesh_address
            && let Some((other, origin)) = claim(&mut self.mesh_addresses, addr, &key, doc)
        {
            let message = format!(
                "{addr} is also the meshAddress of Workload {other} in {origin}; \
                 each workload needs its own"
            );
            self.problems
                .push(doc.problem(Some("spec.meshAddress".to_owned()), message));
        }
        if let Some(ip) = w.spec.address
            && let Some((other, origin)) =
                claim(&mut self.pod_addresses, ip.to_canonical(), &key, doc)
        {
            let message = format!(
                "{ip} is also the address of Workload {other} in {origin}; \
                 each workload needs its own"
            );
            self.problems
                .push(doc.problem(Some("spec.address".to_owned()), message));
        }
    }

    /// A captured connection to a cluster IP must go to one service, so two Services
    /// cannot share one.
    fn unique_service_addresses(&mut self, svc: &Service, doc: &Doc<'_>) {
        let key = svc.metadata.key();
        for (field, ip) in svc.spec.addresses() {
            if let Some((other, origin)) =
                claim(&mut self.service_addresses, ip.to_canonical(), &key, doc)
            {
                let message = format!(
                    "{ip} is also a cluster IP of Service {other} in {origin}; \
                     each service needs its own"
                );
                self.problems.push(doc.problem(Some(field), message));
            }
        }
    }

    /// A named targetPort is resolved against Pod container ports, which a Workload with
    /// `address` does not have: refused here rather than left for `translate` to drop the
    /// endpoints with only a warning.
    fn named_target_ports(&mut self) {
        for (key, svc) in &self.objects.services {
            let Some(pod) = self.objects.workloads.values().find(|w| {
                w.spec.mesh_address.is_none() && w.spec.address.is_some() && selects(svc, w)
            }) else {
                continue;
            };
            let Some(origin) = self.origins.get(&("Service", key.clone())) else {
                continue;
            };
            for (i, port) in svc.spec.ports.iter().enumerate() {
                if let Some(IntOrString::String(name)) = &port.target_port {
                    let message = format!(
                        "named targetPort {name:?} needs Pod container ports; use a number \
                         (selected Workload {} has spec.address)",
                        pod.metadata.key()
                    );
                    self.problems.push(Problem {
                        document: Some(origin.document),
                        object: Some(format!("Service {key}")),
                        field: Some(format!("spec.ports[{i}].targetPort")),
                        ..Problem::new(&origin.file, message)
                    });
                }
            }
        }
    }
}

/// Records that `key` (defined at `doc`) holds `value`; if another object already holds
/// it, returns that object and where it is defined. Objects defined twice are reported as
/// such, not as sharing their own address.
fn claim<V: Hash + Eq>(
    holders: &mut HashMap<V, (ObjectKey, Origin)>,
    value: V,
    key: &ObjectKey,
    doc: &Doc<'_>,
) -> Option<(ObjectKey, Origin)> {
    match holders.get(&value) {
        Some((other, origin)) if other != key => Some((other.clone(), origin.clone())),
        Some(_) => None,
        None => {
            holders.insert(value, (key.clone(), doc.origin()));
            None
        }
    }
}

// === impl Doc ===

impl Doc<'_> {
    fn problem(&self, field: Option<String>, message: impl Into<String>) -> Problem {
        Problem {
            document: Some(self.document),
            object: self.object.clone(),
            field,
            ..Problem::new(self.file, message)
        }
    }

    fn origin(&self) -> Origin {
        Origin {
            file: self.file.to_owned(),
            document: self.document,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads `files` (name, text) from a fresh directory; returns the error lines with
    /// the directory prefix removed.
    fn load(files: &[(&str, &str)]) -> Result<Objects, Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let prefix = format!("{}/", dir.path().display());
        load_dir(dir.path()).map_err(|e| {
            e.problems()
                .iter()
                .map(|p| p.to_string().replace(&prefix, ""))
                .collect()
        })
    }

    const WORKLOAD: &str = "\
apiVersion: local.trellis.dev/v1alpha1
kind: Workload
metadata: {name: web-1, namespace: demo, labels: {app: web}}
spec: {serviceAccount: web, meshAddress: 127.0.0.1:16011}
";

    #[test]
    fn loads_multi_document_files_skipping_empty_documents_and_other_files() {
        let svc = "---\n# comment only\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
                   spec: {ports: [{port: 80}]}\nstatus: {loadBalancer: {}}\n---\n";
        let objects = load(&[
            ("a.yaml", svc),
            ("b.yml", WORKLOAD),
            ("notes.txt", "not: [yaml"),
            (".hidden.yaml", "not: [yaml"),
        ])
        .unwrap();
        let svc = &objects.services[&ObjectKey::new("default", "web")];
        assert_eq!(svc.spec.ports[0].port, 80);
        assert_eq!(
            objects.workloads[&ObjectKey::new("demo", "web-1")]
                .spec
                .service_account,
            "web"
        );
    }

    #[test]
    fn every_problem_in_every_file_is_reported() {
        let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: Web}\n\
                   spec: {ports: [{port: 80, name: http}, {port: 0, name: http}]}\n\
                   ---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n";
        let err = load(&[("a.yaml", bad), ("b.yaml", "key: [unclosed\n")]).unwrap_err();
        assert_eq!(err.len(), 5, "{err:#?}");
        assert!(err[0].starts_with("a.yaml (document 1): Service default/Web: metadata.name: "));
        assert_eq!(
            err[1],
            "a.yaml (document 1): Service default/Web: spec.ports[1].port: must be between 1 and 65535, got 0"
        );
        assert_eq!(
            err[2],
            "a.yaml (document 1): Service default/Web: spec.ports[1].name: duplicate port name \"http\" (also spec.ports[0])"
        );
        assert_eq!(
            err[3],
            "a.yaml (document 2): unsupported kind \"Deployment\" (apiVersion \"apps/v1\"): \
             supported kinds are Service (v1), Workload (local.trellis.dev/v1alpha1), \
             AuthorizationPolicy (policy.trellis.dev/v1alpha1) and HTTPRoute \
             (gateway.networking.k8s.io/v1)"
        );
        assert!(
            err[4].starts_with("b.yaml:2:1 (document 1): invalid YAML: "),
            "{err:?}"
        );
    }

    #[test]
    fn documents_that_are_not_objects_are_reported() {
        let err = load(&[("x.yaml", "metadata: {name: web}\n---\n- a list\n")]).unwrap_err();
        assert_eq!(
            err,
            [
                "x.yaml (document 1): missing kind or apiVersion: supported kinds are \
                 Service (v1), Workload (local.trellis.dev/v1alpha1), AuthorizationPolicy \
                 (policy.trellis.dev/v1alpha1) and HTTPRoute (gateway.networking.k8s.io/v1)",
                "x.yaml (document 2): expected a mapping with apiVersion, kind and metadata",
            ]
        );
    }

    #[test]
    fn oversized_files_are_refused_unparsed() {
        let big = format!("# {}\n", "x".repeat(MAX_FILE_BYTES as usize));
        let err = load(&[("big.yaml", &big)]).unwrap_err();
        assert_eq!(
            err,
            [format!(
                "big.yaml: file is larger than {MAX_FILE_BYTES} bytes"
            )]
        );
    }

    #[test]
    fn too_many_documents_are_refused() {
        let many = "---\n".repeat(MAX_DOCUMENTS + 1);
        let err = load(&[("many.yaml", &many)]).unwrap_err();
        assert_eq!(
            err,
            [format!(
                "many.yaml: holds more than {MAX_DOCUMENTS} documents"
            )]
        );
    }

    #[test]
    fn digest_changes_with_names_and_contents_only() {
        let dir = tempfile::tempdir().unwrap();
        let digest = || read_dir(dir.path()).digest;
        std::fs::write(dir.path().join("a.yaml"), WORKLOAD).unwrap();
        let first = digest();
        assert_eq!(digest(), first);
        std::fs::write(dir.path().join("ignored.txt"), "x").unwrap();
        assert_eq!(digest(), first);
        std::fs::rename(dir.path().join("a.yaml"), dir.path().join("b.yaml")).unwrap();
        assert_ne!(digest(), first);
    }

    #[test]
    fn missing_directory_is_one_problem() {
        let err = load_dir(Path::new("/nonexistent/trellis")).unwrap_err();
        assert_eq!(err.problems().len(), 1);
        assert!(
            err.to_string()
                .starts_with("/nonexistent/trellis: cannot read directory: ")
        );
    }
}
