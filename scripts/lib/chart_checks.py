"""Chart checks for scripts/validate-chart: lint, render, schema negatives, static
assertions. Runs in target/venv-chart (helm-python-sdk, PyYAML, jsonschema).

Usage: chart_checks.py CHART OUTDIR
Writes OUTDIR/<profile>.yaml (every rendered manifest but NOTES.txt) and exits non-zero
with the reason on the first class of failure (every failure of that class is listed).
"""
import json
import os
import sys

import jsonschema
import yaml
from helm_python import chart as hc

KUBE_VERSION = "v1.33.0"
NAMESPACE = "trellis-system"

failures = []

# The exact ClusterRole rules the trust bundle publisher (addon/kube/src/publish.rs) needs:
# see the RBAC assertions in `assertions` and the comments in templates/rbac.yaml.
TRUST_PUBLISH_RULES = [
    {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
     "resourceNames": ["trellis-sidecar-injector"], "verbs": ["get", "update"]},
    {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["validatingwebhookconfigurations"],
     "resourceNames": ["trellis-config"], "verbs": ["get", "update"]},
    {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["trellis-trust-bundle"],
     "verbs": ["get", "update"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
]
TRUST_PUBLISH_RESOURCES = {"configmaps", "mutatingwebhookconfigurations",
                           "validatingwebhookconfigurations"}
# The exact ClusterRole rules the Kubernetes source's cluster-wide watches need
# (addon/kube/src/source.rs: one reflector per kind; the ConfigMap's is namespaced, in the
# Role): read-only.
WATCH_RULES = [
    {"apiGroups": [""], "resources": ["namespaces", "services", "pods"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["policy.trellis.dev"], "resources": ["authorizationpolicies"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes"],
     "verbs": ["get", "list", "watch"]},
]
# The exact ClusterRole rule the HTTPRoute status writer (addon/kube/src/route_status/)
# needs: read and replace the status subresource only (never the route itself, no patch).
ROUTE_STATUS_RULES = [
    {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes/status"],
     "verbs": ["get", "update"]},
]
# The exact entries of the ValidatingWebhookConfiguration trellis-config (templates/
# webhooks.yaml), in order, as every profile renders them (caBundle is asserted absent
# separately). Both reach the control plane's POST /validate (addon/app/src/webhook.rs).
WEBHOOK_SERVICE = {"service": {"name": "trellis-webhook", "namespace": NAMESPACE, "port": 443,
                               "path": "/validate"}}
VALIDATING_WEBHOOKS = [
    {"name": "config.trellis.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
     "failurePolicy": "Fail", "timeoutSeconds": 5, "clientConfig": WEBHOOK_SERVICE,
     "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
                "resources": ["configmaps"], "scope": "Namespaced"}],
     "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}},
     "matchConditions": [{"name": "trellis-config-only",
                          "expression": "object.metadata.name == 'trellis-config'"}]},
    # AuthorizationPolicies in every namespace but kube-system; always Fail (a policy edit
    # is refused while the webhook is down, never admitted unchecked); deletes never sent.
    {"name": "policy.trellis.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
     "failurePolicy": "Fail", "timeoutSeconds": 5, "clientConfig": WEBHOOK_SERVICE,
     "rules": [{"apiGroups": ["policy.trellis.dev"], "apiVersions": ["v1alpha1"],
                "operations": ["CREATE", "UPDATE"], "resources": ["authorizationpolicies"],
                "scope": "Namespaced"}],
     "namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name",
                                                 "operator": "NotIn", "values": ["kube-system"]}]}},
]


def fail(msg):
    failures.append(msg)
    print(f"  FAIL {msg}")


def ok(msg):
    print(f"  ok   {msg}")


def load_values(chart, name):
    if name == "default":
        return {}
    with open(os.path.join(chart, f"values-{name}.yaml")) as f:
        return yaml.safe_load(f) or {}


def merged(base, over):
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def lint(chart, profiles):
    print("== helm lint --strict (Helm SDK, kube " + KUBE_VERSION + ")")
    for p in profiles:
        r = hc.lint(chart, load_values(chart, p), strict=True, namespace=NAMESPACE,
                    kube_version=KUBE_VERSION)
        bad = [m for m in r.get("messages", []) if m.get("severity", 0) >= 2] + r.get("errors", [])
        for m in r.get("messages", []):
            print(f"       [{p}] severity {m.get('severity')}: {m.get('path')}: {m.get('error')}")
        if bad:
            fail(f"lint [{p}]: {bad}")
        else:
            ok(f"lint [{p}]")


def render(c, values, namespace=NAMESPACE):
    return c.render(values, name="trellis", namespace=namespace, is_install=True)


def render_profiles(chart, profiles, outdir):
    print("== render (default, kind, aks)")
    c = hc.Chart.load(chart)
    docs = {}
    for p in profiles:
        try:
            out = render(c, load_values(chart, p))
        except Exception as e:  # noqa: BLE001 - report any render error
            fail(f"render [{p}]: {e}")
            continue
        text = []
        for path in sorted(out):
            if path.endswith("NOTES.txt") or not out[path].strip():
                continue
            text.append(f"# Source: {path}\n{out[path].strip()}\n")
        body = "---\n".join(text)
        with open(os.path.join(outdir, f"{p}.yaml"), "w") as f:
            f.write(body)
        docs[p] = [d for d in yaml.safe_load_all(body) if d]
        kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs[p])
        ok(f"render [{p}]: {len(docs[p])} objects -> {outdir}/{p}.yaml")
        print("       " + ", ".join(kinds))
    return c, docs


# (what, values, a string the error must contain: the refused field)
NEGATIVE = [
    ("replicas 0", {"controlPlane": {"replicas": 0}}, "/controlPlane/replicas"),
    ("unknown key controlPlane.replica", {"controlPlane": {"replica": 3}}, "'replica' not allowed"),
    ("unknown top-level key", {"controlplane": {}}, "'controlplane' not allowed"),
    ("bad proxy logLevel", {"meshConfig": {"proxy": {"logLevel": "loud"}}}, "/meshConfig/proxy/logLevel"),
    ("bad proxy memory quantity", {"meshConfig": {"proxy": {"resources": {"limits": {"memory": "1GB"}}}}},
     "/meshConfig/proxy/resources/limits/memory"),
    ("bad image digest", {"proxy": {"image": {"digest": "sha256:xyz"}}}, "/proxy/image/digest"),
    ("https OTLP collector", {"meshConfig": {"tracing": {"otlp": "https://c:4317"}}}, "/meshConfig/tracing/otlp"),
    ("self-signed CA with 2 replicas", {"meshConfig": {"ca": {"source": "self-signed"}}}, "/meshConfig/ca/source"),
    ("keyvault source without keyvault", {"meshConfig": {"ca": {"source": "keyvault-secret"}}}, "keyvault"),
    ("http OIDC issuer", {"controlPlane": {"oidc": {"issuerUrl": "http://issuer"}}}, "/controlPlane/oidc/issuerUrl"),
    ("bad failurePolicy", {"webhook": {"injector": {"failurePolicy": "Maybe"}}}, "/webhook/injector/failurePolicy"),
    ("sampling over 100", {"meshConfig": {"tracing": {"sampling": 101}}}, "/meshConfig/tracing/sampling"),
    ("workload identity client id not a GUID", {"serviceAccount": {"workloadIdentityClientId": "me"}},
     "/serviceAccount/workloadIdentityClientId"),
]


def negatives(c):
    print(f"== values.schema.json: {len(NEGATIVE)} bad values must fail to render, naming the field")
    for what, values, expect in NEGATIVE:
        try:
            render(c, values)
        except Exception as e:  # noqa: BLE001
            detail = " | ".join(line.strip() for line in str(e).splitlines()[2:])[:200]
            if expect in str(e):
                ok(f"refused: {what}: {detail}")
            else:
                fail(f"refused for another reason: {what}: {e}")
        else:
            fail(f"rendered although invalid: {what} ({json.dumps(values)})")
    # Not the schema: the AuthorizationPolicy webhook stays Fail whatever the trellis-config
    # entry's failurePolicy is, and follows validator.timeoutSeconds.
    try:
        out = render(c, {"webhook": {"validator": {"failurePolicy": "Ignore", "timeoutSeconds": 7}}})
        rendered = [d for path, t in out.items() if not path.endswith("NOTES.txt")
                    for d in yaml.safe_load_all(t) if d]
        vwc = find(rendered, "ValidatingWebhookConfiguration", "trellis-config")
        got = {w["name"]: (w["failurePolicy"], w["timeoutSeconds"]) for w in vwc["webhooks"]}
        if got == {"config.trellis.dev": ("Ignore", 7), "policy.trellis.dev": ("Fail", 7)}:
            ok("validator.failurePolicy Ignore leaves the AuthorizationPolicy webhook at Fail")
        else:
            fail(f"validator.failurePolicy Ignore: webhooks {got}")
    except Exception as e:  # noqa: BLE001
        fail(f"render with validator.failurePolicy Ignore: {e}")
    # Not the schema: the template refuses any namespace but trellis-system.
    try:
        render(c, {}, namespace="default")
    except Exception as e:  # noqa: BLE001
        ok(f"refused: namespace default: {str(e).splitlines()[0][:160]}")
    else:
        fail("rendered into namespace default")


def find(docs, kind, name):
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    return None


def assertions(docs, podmonitor_schema):
    print("== chart invariants")
    known_keys = {"ca", "discovery", "outboundTrafficPolicy", "proxy", "tracing", "trustDomain"}
    for p, ds in docs.items():
        dep = find(ds, "Deployment", "trellis-control-plane")
        c = dep["spec"]["template"]["spec"]["containers"][0]
        args = c["args"]
        need = ["run", "--kubernetes", "--grpc-addr=0.0.0.0:15010", "--admin-addr=127.0.0.1:9091",
                "--metrics-addr=0.0.0.0:9090",
                "--webhook-listen=0.0.0.0:9443", "--token-issuer=oidc",
                "--state-dir=/var/run/trellis/state"]
        missing = [a for a in need if a not in args]
        if missing:
            fail(f"[{p}] control plane args miss {missing}")
        # The webhook certificate comes from the mesh CA (the caBundle is the mesh trust
        # bundle): certificate files would override it with one the API server does not trust.
        if any(a.startswith(("--webhook-cert", "--webhook-key")) for a in args):
            fail(f"[{p}] control plane serves the webhook from certificate files: {args}")
        env = {e["name"] for e in c.get("env", [])}
        if "POD_NAME" not in env:
            fail(f"[{p}] POD_NAME not set")
        # --kubernetes with --webhook-listen serves /inject, which exits 64 without an image.
        if not {"TRELLIS_PROXY_IMAGE", "TRELLIS_PROXY_INIT_IMAGE"} <= env:
            fail(f"[{p}] the injector's images are not set: {sorted(env)}")
        sc = c["securityContext"]
        if not (sc.get("readOnlyRootFilesystem") and sc.get("runAsNonRoot")
                and sc["capabilities"]["drop"] == ["ALL"]
                and sc["seccompProfile"]["type"] == "RuntimeDefault"
                and sc.get("allowPrivilegeEscalation") is False):
            fail(f"[{p}] container securityContext not hardened: {sc}")
        cm = find(ds, "ConfigMap", "trellis-config")
        if cm is None or set(cm["data"]) - known_keys or "tracing" not in cm["data"]:
            fail(f"[{p}] trellis-config keys: {cm and sorted(cm['data'])}")
        else:
            for k, v in cm["data"].items():
                if k != "trustDomain" and not isinstance(yaml.safe_load(v), dict):
                    fail(f"[{p}] trellis-config data.{k} is not a YAML mapping")
        # RBAC: no wildcard, no secrets, no write verbs outside the named ones. The only
        # cluster-wide writes publish the mesh trust bundle (trellis_kube::publish: the
        # webhooks' caBundle, a ConfigMap per namespace), and only in exactly these rules:
        # get/update by resourceNames, plus ConfigMap create, which RBAC cannot restrict by
        # name. Any other rule on those resources in the ClusterRole (list, watch, delete,
        # patch, another name) fails, and so does a missing one (the publisher needs all).
        # The one other cluster-wide write is the HTTPRoute status writer's
        # (trellis_kube::route_status): get/update of httproutes/status, exactly.
        for d in ds:
            if d["kind"] not in ("ClusterRole", "Role"):
                continue
            for r in d["rules"]:
                if "*" in r.get("verbs", []) + r.get("resources", []) + r.get("apiGroups", []):
                    fail(f"[{p}] {d['kind']}/{d['metadata']['name']} has a wildcard: {r}")
                if "secrets" in r.get("resources", []):
                    fail(f"[{p}] {d['kind']}/{d['metadata']['name']} reads secrets")
                writes = set(r["verbs"]) - {"get", "list", "watch"}
                if d["kind"] == "ClusterRole":
                    if set(r.get("resources", [])) & TRUST_PUBLISH_RESOURCES:
                        if r not in TRUST_PUBLISH_RULES:
                            fail(f"[{p}] ClusterRole rule on trust bundle targets is not one of "
                                 f"the exact publishing rules: {r}")
                    elif "httproutes/status" in r.get("resources", []):
                        if r not in ROUTE_STATUS_RULES:
                            fail(f"[{p}] ClusterRole rule on httproutes/status is not the exact "
                                 f"route status rule: {r}")
                    elif writes:
                        fail(f"[{p}] ClusterRole writes: {r}")
                elif writes and r["resources"] not in (["leases"], ["events"]):
                    fail(f"[{p}] write verbs on {r['resources']}")
        cr = find(ds, "ClusterRole", "trellis-control-plane")
        for r in TRUST_PUBLISH_RULES:
            if cr is None or r not in cr["rules"]:
                fail(f"[{p}] ClusterRole trellis-control-plane lacks the trust bundle rule {r}")
        for r in WATCH_RULES:
            if cr is None or r not in cr["rules"]:
                fail(f"[{p}] ClusterRole trellis-control-plane lacks the watch rule {r}")
        for r in ROUTE_STATUS_RULES:
            if cr is None or r not in cr["rules"]:
                fail(f"[{p}] ClusterRole trellis-control-plane lacks the route status rule {r}")
        if cr is not None:
            for r in cr["rules"]:
                if r not in WATCH_RULES + TRUST_PUBLISH_RULES + ROUTE_STATUS_RULES:
                    fail(f"[{p}] ClusterRole trellis-control-plane has a rule that is neither "
                         f"a watch, a trust bundle nor a route status rule: {r}")
        # The cluster-wide ConfigMap create is narrowed back to one name by an admission
        # policy (rendered for Kubernetes >= 1.30, which the SDK's default version is).
        vap = find(ds, "ValidatingAdmissionPolicy", "trellis-control-plane-configmaps")
        vapb = find(ds, "ValidatingAdmissionPolicyBinding", "trellis-control-plane-configmaps")
        sa = "system:serviceaccount:trellis-system:trellis-control-plane"
        if (vap is None or vapb is None
                or vap["spec"]["matchConditions"][0]["expression"] != f'request.userInfo.username == "{sa}"'
                or vap["spec"]["validations"][0]["expression"] != 'object.metadata.name == "trellis-trust-bundle"'
                or vap["spec"]["matchConstraints"]["resourceRules"][0]["operations"] != ["CREATE"]
                or vap["spec"]["failurePolicy"] != "Fail"
                or vapb["spec"]["validationActions"] != ["Deny"]):
            fail(f"[{p}] the ConfigMap-create admission policy is missing or wrong: {vap} {vapb}")
        mwc = find(ds, "MutatingWebhookConfiguration", "trellis-sidecar-injector")
        w = mwc["webhooks"][0]
        want = {"failurePolicy": "Fail", "sideEffects": "None", "reinvocationPolicy": "Never",
                "timeoutSeconds": 10}
        got = {k: w.get(k) for k in want}
        if got != want or w["clientConfig"]["service"]["path"] != "/inject":
            fail(f"[{p}] injector webhook: {got}, path {w['clientConfig']['service']['path']}")
        for d in ds:
            if d["kind"].endswith("WebhookConfiguration"):
                for wh in d["webhooks"]:
                    if "caBundle" in wh["clientConfig"]:
                        fail(f"[{p}] {d['kind']} templates a caBundle")
        # Exactly these validating entries: another resource, operation or namespace, a
        # missing entry or an extra one fails.
        vwc = find(ds, "ValidatingWebhookConfiguration", "trellis-config")
        if vwc is None or vwc["webhooks"] != VALIDATING_WEBHOOKS:
            fail(f"[{p}] ValidatingWebhookConfiguration trellis-config: "
                 f"{vwc and json.dumps(vwc['webhooks'])}")
        # Every checkov skip carries a written reason.
        for d in ds:
            for k, v in (d["metadata"].get("annotations") or {}).items():
                if k.startswith("checkov.io/skip"):
                    check, _, why = str(v).partition("=")
                    if not check.startswith("CKV") or len(why.strip()) < 20:
                        fail(f"[{p}] {d['kind']}/{d['metadata']['name']}: {k} without a reason")
        for d in ds:
            if d["kind"] == "PodMonitor":
                try:
                    jsonschema.validate(d, podmonitor_schema)
                    ok(f"[{p}] PodMonitor/{d['metadata']['name']} matches tests/chart/podmonitor.schema.json")
                except jsonschema.ValidationError as e:
                    fail(f"[{p}] PodMonitor: {e.message} at {list(e.absolute_path)}")
        if not failures:
            ok(f"[{p}] args, securityContext, trellis-config keys, RBAC scope, webhooks, checkov reasons")


def main():
    chart, outdir = sys.argv[1], sys.argv[2]
    os.makedirs(outdir, exist_ok=True)
    profiles = ["default", "kind", "aks"]
    lint(chart, profiles)
    c, docs = render_profiles(chart, profiles, outdir)
    negatives(c)
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "..", "tests", "chart", "podmonitor.schema.json")) as f:
        pm_schema = json.load(f)
    if docs:
        assertions(docs, pm_schema)
    if failures:
        print(f"chart checks: {len(failures)} failure(s)")
        sys.exit(1)


if __name__ == "__main__":
    main()
