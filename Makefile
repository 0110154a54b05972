# Kefu — `make run` starts one node with embedded defaults; `make test` installs what the tests need and
# runs them. `make help` lists every target.

SHELL := /bin/bash
CARGO ?= cargo
LISTEN ?= 127.0.0.1:8080
TCP_LISTEN ?= 127.0.0.1:8081
DATA_DIR ?= ./data

.DEFAULT_GOAL := help

# Each area adds its own targets in mk/<area>.mk and appends its extra test target to EXTRA_TESTS
# (e.g. browser tests, operator end-to-end), so `make test` runs everything.
EXTRA_TESTS :=
-include mk/*.mk

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

.PHONY: deps
deps: ## install the toolchain pieces the build and tests need (fresh Debian machine)
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (rustup) first"; exit 1; }
	@rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy
	@# A clean `make test` needs ~1.5 GB for target/ plus the browser and tools; a full disk otherwise shows up
	@# as a linker "Bus error" minutes into the build.
	@free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); if [ "$${free_kb:-0}" -lt 3145728 ]; then \
	  echo "warning: only $$((free_kb / 1024)) MiB free here; building and testing Kefu needs about 3 GiB" >&2; fi

.PHONY: build
build: deps ## build every crate (debug)
	$(CARGO) build --workspace --all-targets

.PHONY: run
run: deps ## start one node on $(LISTEN) (raw TCP on $(TCP_LISTEN)) with data under $(DATA_DIR); logs the demo agent's token
	$(CARGO) build --release -p kefu-node
	KEFU_SERVER__TCP_LISTEN=$(TCP_LISTEN) ./target/release/kefu-node --listen $(LISTEN) --data-dir $(DATA_DIR) serve

.PHONY: test
test: deps test-rust $(EXTRA_TESTS) ## run every test: Rust unit/integration/crash tests, then each area's extra suites

.PHONY: test-rust
test-rust: deps ## Rust tests of every crate (unit, property, integration with real sockets, crash/restart)
	$(CARGO) build -p kefu-node --bin kefu-node
	$(CARGO) test --workspace --all-targets

.PHONY: lint
lint: deps ## rustfmt check + clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

.PHONY: fmt
fmt: ## format the code
	$(CARGO) fmt --all

.PHONY: clean-data
clean-data: ## delete the local data directory of `make run`
	rm -rf $(DATA_DIR)
