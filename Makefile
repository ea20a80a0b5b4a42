# What people run. `make test` is what CI runs (after `make lint`).
CARGO ?= cargo

.PHONY: test servers build dist lint e2e faults node bench fmt

## Build the real test servers (cached), the release binaries, then run every test.
test: servers build
	$(CARGO) test --release --locked --workspace

## Build etcd, the Kubernetes v1.32 control plane, kubelet, kube-proxy, MinIO,
## mc and helm from their Go modules into ~/.cache/localship-test (a no-op
## when cached), and install the real node's Debian packages where missing.
servers:
	bash tests/servers/node-packages.sh
	bash tests/servers/build.sh >/dev/null
	bash tests/servers/helm/build.sh >/dev/null
	bash tests/airflow/setup.sh >/dev/null
	bash tests/airflow/setup.sh requirements-2.10.lock >/dev/null

## The release binaries the e2e tests run (the same ones the image ships).
build:
	$(CARGO) build --release --locked --bins

## The binaries as the image ships them (profile `dist`, each built on its own; slow).
## `LOCALSHIP_PROFILE=dist` makes the tests and benches run these instead.
dist:
	$(CARGO) build --profile dist --locked -p localship-provisioner
	$(CARGO) build --profile dist --locked -p localship-logshipper

## Only the end-to-end tests against the real servers.
e2e: servers build
	$(CARGO) test --release --locked -p localship-tests

## Only the fault suite: kills, an apiserver restart, hostile inputs (minutes).
faults: servers build
	$(CARGO) test --release --locked -p localship-tests --test faults

## Only the real-node suite: localship installed on a kubelet with containerd (minutes).
node: servers build
	$(CARGO) test --release --locked -p localship-tests --test node

## Every benchmark, each printing its table with ratios against its anchor (an hour).
bench: servers build
	$(CARGO) bench --locked -p localship-tests

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --locked --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all
