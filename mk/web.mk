# Browser tests of the widget, demo site and agent console: headless Debian Chromium driven by
# playwright-core (never `npx playwright install`: browser downloads are blocked here).

WEB_TEST_DIR := e2e/browser

.PHONY: web-deps
web-deps: ## install Chromium, CJK fonts and playwright-core for the browser tests (idempotent)
	@if ! command -v chromium >/dev/null; then \
		echo "installing chromium (apt)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk >/dev/null; \
	fi
	@dpkg -s fonts-noto-cjk >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-cjk >/dev/null
	@command -v node >/dev/null || { echo "node (Node.js 20) is required for the browser tests"; exit 1; }
	@cd $(WEB_TEST_DIR) && { [ -d node_modules/playwright-core ] || npm ci --no-audit --no-fund --loglevel=error; }

.PHONY: test-web
test-web: web-deps ## browser tests: widget and console against a real node (screenshots in e2e/browser/artifacts)
	$(CARGO) build -p kefu-node --bin kefu-node
	cd $(WEB_TEST_DIR) && node --test --test-concurrency=1 .

.PHONY: screenshots
screenshots: test-web ## refresh the README screenshots from the browser tests' artifacts
	mkdir -p docs/screenshots
	cp $(WEB_TEST_DIR)/artifacts/widget.png $(WEB_TEST_DIR)/artifacts/console.png docs/screenshots/

EXTRA_TESTS += test-web
