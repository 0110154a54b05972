#!/usr/bin/env bash
# Real-cluster end-to-end (NOT run in CI: it needs a cluster and the images). Uses $KUBECONFIG (kind, k3d,
# or any cluster you may write to). Images: build and load them first, e.g. with kind:
#   docker build -f node/Dockerfile -t ghcr.io/kefu-chat/kefu-node:0.1.0 .
#   docker build -f operator/Dockerfile -t ghcr.io/kefu-chat/kefu-operator:0.1.0 .
#   kind load docker-image ghcr.io/kefu-chat/kefu-node:0.1.0 ghcr.io/kefu-chat/kefu-operator:0.1.0
# Then: make e2e-kind
set -euo pipefail
: "${KUBECONFIG:?set KUBECONFIG to a test cluster (kind/k3d)}"
KUBECTL="${KUBECTL:-kubectl}"
HELM="${HELM:-helm}"
NS="${NS:-kefu-e2e}"
$KUBECTL get nodes >/dev/null
env $HELM upgrade --install kefu-operator charts/kefu-operator -n kefu-system --create-namespace --wait --timeout 5m
$KUBECTL create namespace "$NS" --dry-run=client -o yaml | $KUBECTL apply -f -
$KUBECTL -n "$NS" create secret generic kefu-auth --from-literal=secret="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
  --dry-run=client -o yaml | $KUBECTL apply -f -
$KUBECTL -n "$NS" apply -f config/kefucluster-minimal.yaml
$KUBECTL -n "$NS" wait kefucluster/chat --for=condition=Ready --timeout=5m
$KUBECTL -n "$NS" patch kefucluster chat --type merge -p '{"spec":{"auth":{"secretRef":{"name":"kefu-auth","key":"secret"}}}}'
$KUBECTL -n "$NS" scale kefucluster chat --replicas=3
$KUBECTL -n "$NS" wait statefulset/chat --for=jsonpath='{.status.readyReplicas}'=3 --timeout=5m
$KUBECTL -n "$NS" wait kefucluster/chat --for=condition=Ready --timeout=5m
$KUBECTL -n "$NS" scale kefucluster chat --replicas=1
$KUBECTL -n "$NS" wait statefulset/chat --for=jsonpath='{.status.replicas}'=1 --timeout=5m
$KUBECTL -n "$NS" delete kefucluster chat --wait --timeout=5m
echo "e2e-kind: install, Ready, scale up/down and delete all worked"
