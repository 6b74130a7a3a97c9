#!/usr/bin/env bash
# End-to-end on a real cluster: kind, the Gateway API CRDs, meshlet from daemonset/, echo pods, and
# two checks through real Services:
#   1. a weighted split: an HTTPRoute (parentRef: Service "echo") sending 80% to echo-v1 and 20% to
#      echo-v2; 200 requests from a client pod land within a loose band around 160/40;
#   2. a consumer route: an HTTPRoute in the client's namespace sending all of "echo" to echo-v2;
#      clients in that namespace see only v2, clients elsewhere still see the producer split.
#
#   vagrant/kind-e2e.sh [--keep]        needs docker, kind, kubectl; builds the image locally
#
# Not run in CI (no container engine there). --keep leaves the cluster for inspection.
# Exit 0 when both checks pass; the cluster is deleted on exit unless --keep.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cluster=meshlet-e2e
image=ghcr.io/meshlet/meshlet:e2e
gateway_api=${GATEWAY_API_VERSION:-v1.2.1}
keep=0
[ "${1:-}" = --keep ] && keep=1
say() { printf 'kind-e2e: %s\n' "$*"; }
die() { printf 'kind-e2e: error: %s\n' "$*" >&2; exit 1; }
for tool in docker kind kubectl; do command -v "$tool" >/dev/null || die "$tool is not installed"; done

cleanup() { if [ "$keep" = 0 ]; then kind delete cluster --name "$cluster" >/dev/null 2>&1 || true; fi; }
trap cleanup EXIT

say "cluster $cluster"
# kind nodes are containers sharing the host's kernel: the node image has no headers, so the
# host's are mounted in (bcc compiles against the running kernel, which is the host's).
kind create cluster --name "$cluster" --wait 120s --config - <<'YAML'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
    extraMounts: &headers
      - {hostPath: /lib/modules, containerPath: /lib/modules, readOnly: true}
      - {hostPath: /usr/src, containerPath: /usr/src, readOnly: true}
  - role: worker
    extraMounts: *headers
YAML
for node in $(kind get nodes --name "$cluster"); do
  docker exec "$node" test -d "/lib/modules/$(uname -r)/build" \
    || die "node $node has no /lib/modules/$(uname -r)/build: create the cluster with extraMounts of /lib/modules and /usr/src"
done

say "image"
docker build -t "$image" "$repo"
kind load docker-image "$image" --name "$cluster"

say "Gateway API CRDs $gateway_api (experimental channel: TCPRoute, UDPRoute, TLSRoute)"
kubectl apply --server-side -f "https://github.com/kubernetes-sigs/gateway-api/releases/download/$gateway_api/experimental-install.yaml"

say "meshlet"
work=$(mktemp -d)
cp -r "$repo/daemonset/." "$work/"
(cd "$work" && kubectl kustomize . | sed "s#ghcr.io/meshlet/meshlet:0.1.0#$image#") | kubectl apply -f -
kubectl -n meshlet-system rollout status daemonset/meshlet --timeout=300s

say "echo pods and routes"
kubectl apply -f - <<'YAML'
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: canary}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo-v1, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: echo, version: v1}}
  template:
    metadata: {labels: {app: echo, version: v1}}
    spec:
      containers:
        - name: echo
          image: registry.k8s.io/e2e-test-images/agnhost:2.47
          args: [netexec, --http-port=8080]
          env: [{name: VERSION, value: v1}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo-v2, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: echo, version: v2}}
  template:
    metadata: {labels: {app: echo, version: v2}}
    spec:
      containers:
        - name: echo
          image: registry.k8s.io/e2e-test-images/agnhost:2.47
          args: [netexec, --http-port=8080]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: shop}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-v1, namespace: shop}
spec:
  selector: {app: echo, version: v1}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: shop}
spec:
  selector: {app: echo, version: v2}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo-split, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - backendRefs:
        - {name: echo-v1, port: 80, weight: 80}
        - {name: echo-v2, port: 80, weight: 20}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo-to-v2, namespace: canary}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, namespace: shop, port: 80}]
  rules:
    - backendRefs: [{name: echo-v2, namespace: shop, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: canary-to-echo, namespace: shop}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: canary}]
  to: [{group: "", kind: Service}]
YAML
kubectl -n shop rollout status deployment/echo-v1 --timeout=180s
kubectl -n shop rollout status deployment/echo-v2 --timeout=180s
for ns in shop canary; do
  kubectl -n "$ns" run client --image=registry.k8s.io/e2e-test-images/agnhost:2.47 --restart=Never --command -- sleep 3600
  kubectl -n "$ns" wait --for=condition=Ready pod/client --timeout=120s
done
sleep 5  # one sync interval for the routes

# "v1"/"v2" per request: each connect() is a new choice in the kernel (agnhost's /hostname
# names the pod, whose name starts with its Deployment's).
count_versions() {  # NAMESPACE -> "v1 v2" counts over 200 requests
  # shellcheck disable=SC2016  # $(seq) expands in the client pod, not here
  kubectl -n "$1" exec client -- sh -c \
    'for i in $(seq 200); do wget -qO- -T 2 http://echo.shop/hostname; echo; done' \
    | awk '/^echo-v1/{a++} /^echo-v2/{b++} END{print a+0, b+0}'
}

read -r v1 v2 < <(count_versions shop)
say "producer split from shop: v1=$v1 v2=$v2 (want about 160/40)"
[ $((v1 + v2)) = 200 ] || die "only $((v1 + v2)) of 200 requests answered"
if [ "$v2" -lt 20 ] || [ "$v2" -gt 65 ]; then die "weighted split off: v2=$v2 of 200 (80/20 expected)"; fi

read -r v1 v2 < <(count_versions canary)
say "consumer route from canary: v1=$v1 v2=$v2 (want 0/200)"
if [ "$v1" != 0 ] || [ "$v2" != 200 ]; then die "consumer route not applied: v1=$v1 v2=$v2"; fi

say "route status"
kubectl -n shop get httproute echo-split -o jsonpath='{.status.parents[*].conditions[?(@.type=="Accepted")].status}' | grep -q True \
  || die "echo-split has no Accepted=True condition from meshlet"
say "passed"
