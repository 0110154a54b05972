# Benchmarks (PERFORMANCE.md): the node pinned to CPU 0, the load generator to CPU 1.

BENCH_OUT ?= bench/results/latest

.PHONY: bench
bench: deps ## run the benchmark suite (~8 min): writes $(BENCH_OUT)/report.{json,md} and plot.svg
	$(CARGO) build --release -p kefu-node -p kefu-bench
	taskset -c 1 ./target/release/kefu-bench suite --node-bin target/release/kefu-node --server-cpus 0 --client-cpus 1 --out $(BENCH_OUT)
	@echo "report: $(BENCH_OUT)/report.md"

.PHONY: test-bench-smoke
test-bench-smoke: deps ## a tiny kefu-bench run (few connections, seconds) so the tool cannot rot; checks no loss, not speed
	$(CARGO) build -p kefu-node -p kefu-bench --bins
	./target/debug/kefu-bench smoke --node-bin target/debug/kefu-node --server-cpus "" --out $$(mktemp -d)

EXTRA_TESTS += test-bench-smoke

.PHONY: bench-p2
bench-p2: deps ## P2 at full size: 19,000 idle connections held 10 min (~12 min); writes bench/results/p2/
	$(CARGO) build --release -p kefu-node -p kefu-bench
	taskset -c 1 ./target/release/kefu-bench suite --node-bin target/release/kefu-node --server-cpus 0 --client-cpus 1 --phases hold --hold 19000 --hold-secs 600 --out bench/results/p2
	@echo "report: bench/results/p2/report.md"
