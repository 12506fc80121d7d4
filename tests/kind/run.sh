#!/usr/bin/env bash
# The kind profile, end to end, on a machine with Docker, kind, kubectl and helm (3.x or
# 4.x): create a cluster, build and load the images, install the chart with
# values-kind.yaml, run a three-service demo in an injected namespace, check mTLS
# identities, golden metrics and `trellis check`, then delete the cluster.
#
#   tests/kind/run.sh              # everything, cluster deleted at the end (also on failure)
#   KEEP_CLUSTER=1 tests/kind/run.sh   # leave the cluster running to look around
#
# Its steps are the README's "kind profile" section, one for one (scripts/validate-chart
# checks that the step titles agree).
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER="${CLUSTER:-trellis}"
NODE_IMAGE="${NODE_IMAGE:-kindest/node:v1.33.1}"
CP_IMAGE=localhost/trellis/control-plane:kind
PROXY_IMAGE=localhost/trellis/proxy:kind
INIT_IMAGE=localhost/trellis/proxy-init:kind
BUSYBOX=docker.io/library/busybox:1.37.0
NS=trellis-system
DEMO=trellis-demo
TD=cluster.local
work="$(mktemp -d)"

step() { printf '\n=== %s\n' "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

cleanup() {
  local rc=$?
  if [[ "${KEEP_CLUSTER:-0}" == 1 ]]; then
    echo "cluster kept: kind delete cluster --name ${CLUSTER}"
  else
    kind delete cluster --name "${CLUSTER}" >/dev/null 2>&1 || true
  fi
  rm -rf "${work}"
  if (( rc == 0 )); then echo "kind profile: PASS"; else echo "kind profile: FAIL (exit ${rc})"; fi
}
trap cleanup EXIT

for tool in docker kind kubectl helm; do
  command -v "${tool}" >/dev/null || die "${tool} is not installed"
done

step "1. Create the kind cluster"
kind create cluster --name "${CLUSTER}" --image "${NODE_IMAGE}" --config tests/kind/cluster.yaml --wait 120s
kubectl config use-context "kind-${CLUSTER}"

step "2. Build and load the images"
docker build -f images/control-plane/Dockerfile -t "${CP_IMAGE}" .
docker build -f images/proxy/Dockerfile -t "${PROXY_IMAGE}" .
docker build -f images/proxy/Dockerfile --target init -t "${INIT_IMAGE}" .
docker pull -q "${BUSYBOX}"
kind load docker-image --name "${CLUSTER}" "${CP_IMAGE}" "${PROXY_IMAGE}" "${INIT_IMAGE}" "${BUSYBOX}"

step "3. Create the CA Secret"
kubectl create namespace "${NS}"
# The mesh CA: a root and an intermediate in the Istio cacerts layout, made by the CLI in
# the control plane image, stored as the Secret the `secret` CA source reads.
mkdir -p "${work}/cacerts"
docker run --rm --user "$(id -u):$(id -g)" -v "${work}/cacerts:/out" \
  --entrypoint /usr/local/bin/trellis "${CP_IMAGE}" \
  ca create-plugin --dir /out --trust-domain "${TD}" --force
kubectl -n "${NS}" create secret generic cacerts --from-file="${work}/cacerts"
# No webhook Secret: the control plane serves its webhooks with a certificate it issues
# from this CA for trellis-webhook.trellis-system.svc.
# The CA verifies proxies' ServiceAccount tokens against the API server's OIDC issuer,
# whose discovery documents kind serves to authenticated callers only by default.
kubectl create clusterrolebinding trellis-oidc-discovery \
  --clusterrole=system:service-account-issuer-discovery --group=system:unauthenticated

step "4. Install the chart with values-kind.yaml"
helm install trellis charts/trellis -n "${NS}" -f charts/trellis/values-kind.yaml --wait --timeout 5m
# caBundle: the chart leaves it empty; the elected control plane replica fills it with the
# mesh trust bundle (and publishes ConfigMap trellis-trust-bundle in every namespace).
bundle() {
  kubectl -n "${NS}" get configmap trellis-trust-bundle -o jsonpath='{.data.trust-bundle\.pem}' 2>/dev/null |
    base64 | tr -d '\n'
}
for hook in mutatingwebhookconfiguration/trellis-sidecar-injector validatingwebhookconfiguration/trellis-config; do
  got="" want=""
  for _ in $(seq 1 60); do
    want="$(bundle)"
    got="$(kubectl get "${hook}" -o jsonpath='{.webhooks[0].clientConfig.caBundle}')"
    [[ -n "${want}" && "${got}" == "${want}" ]] && break
    sleep 1
  done
  [[ -n "${want}" && "${got}" == "${want}" ]] ||
    die "${hook}: caBundle is not the published trust bundle after 60s"
done
grep -q "$(sed -n 2p "${work}/cacerts/root-cert.pem")" <<<"$(bundle | base64 -d)" ||
  die "the published trust bundle does not hold the mesh root"
echo "caBundle of both webhook configurations: the trust bundle, which holds the mesh root"
helm test trellis -n "${NS}" --logs

step "5. Deploy the demo in an injected namespace"
kubectl apply -f tests/kind/demo.yaml -f tests/kind/outsider.yaml
for d in web api client; do
  kubectl -n "${DEMO}" rollout status "deployment/${d}" --timeout 180s
done
kubectl -n trellis-outside wait --for=condition=Ready pod/outsider --timeout 120s
for d in web api client; do
  images="$(kubectl -n "${DEMO}" get pods -l "app=${d}" \
    -o jsonpath='{range .items[*]}{.spec.initContainers[*].image} {.spec.containers[*].image}{"\n"}{end}')"
  grep -q "${PROXY_IMAGE}" <<<"${images}" || die "${d} pods were not injected: ${images}"
done
echo "every demo pod carries ${PROXY_IMAGE}"

step "6. Send traffic and check mTLS identities"
for i in $(seq 1 20); do
  for svc in web api; do
    body="$(kubectl -n "${DEMO}" exec deploy/client -c client -- wget -qO- "http://${svc}.${DEMO}/hello?n=${i}")"
    grep -q "\"workload\":\"${svc}\"" <<<"${body}" || die "${svc} did not answer: ${body}"
    grep -q "\"caller\":\"spiffe://${TD}/ns/${DEMO}/sa/client\"" <<<"${body}" \
      || die "${svc} did not see the client's SPIFFE id: ${body}"
  done
done
echo "40 requests: web and api saw caller spiffe://${TD}/ns/${DEMO}/sa/client"
web_ip="$(kubectl -n "${DEMO}" get pods -l app=web -o jsonpath='{.items[0].status.podIP}')"
if kubectl -n trellis-outside exec outsider -- wget -qO- -T 5 "http://${web_ip}:8080/hello" >/dev/null 2>&1; then
  die "a plaintext request from outside the mesh reached web at ${web_ip}"
fi
echo "plaintext from outside the mesh to ${web_ip}:8080: refused"

step "7. Check golden metrics with trellis stat"
proxies=()
for ip in $(kubectl -n "${DEMO}" get pods -o jsonpath='{.items[*].status.podIP}'); do
  proxies+=(--proxy "${ip}:15090")
done
stat="$(kubectl -n "${NS}" exec deploy/trellis-control-plane -c control-plane -- \
  trellis stat --since-start --by workload "${proxies[@]}")"
echo "${stat}"
for w in web api; do
  grep -Eq "^${DEMO} +${w} +100\.00%" <<<"${stat}" || die "no 100% success row for ${DEMO}/${w}"
done

step "8. Run trellis check and a rejected config edit"
# From outside, as a user would: through the API server (kubeconfig of the kind cluster),
# with the CLI in the control plane image. Then inside a replica, against its admin port.
kind get kubeconfig --name "${CLUSTER}" >"${work}/kubeconfig"
docker run --rm --network host --user "$(id -u):$(id -g)" \
  -v "${work}/kubeconfig:/kubeconfig:ro" -e KUBECONFIG=/kubeconfig \
  --entrypoint /usr/local/bin/trellis "${CP_IMAGE}" check --kubernetes
kubectl -n "${NS}" exec deploy/trellis-control-plane -c control-plane -- trellis check --admin 127.0.0.1:9091
if out="$(kubectl -n "${NS}" patch configmap trellis-config --type merge \
  -p '{"data":{"proxy":"logLevel: loud\n"}}' 2>&1)"; then
  die "the webhook admitted a bad trellis-config: ${out}"
fi
grep -q "data.proxy" <<<"${out}" || die "the refusal does not name data.proxy: ${out}"
echo "bad trellis-config refused: ${out}"

step "9. Delete the cluster"
# Done by the EXIT trap (also on failure); KEEP_CLUSTER=1 keeps it.
