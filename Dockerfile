# One image, two binaries: localship-provisioner and localship-logshipper.
# docker build -t ghcr.io/localship/localship:0.1.0 .

FROM rust:1.95-bookworm AS build
# aws-lc-sys (TLS for the S3 client) builds its C sources with cmake.
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# `make dist`: each binary built on its own, so neither carries code that only the other's
# dependencies switch on, with whole-program optimisation (BENCHMARKS.md, P3).
RUN make dist \
 && install -m 0755 target/dist/localship-provisioner target/dist/localship-node-cleanup target/dist/localship-logshipper /usr/local/bin/

# distroless/cc: glibc, libgcc and CA certificates, no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="localship" \
      org.opencontainers.image.description="Node-local PersistentVolumes and durable Airflow task-log shipping for Kubernetes" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/localship/localship"
COPY --from=build /usr/local/bin/localship-provisioner /usr/local/bin/localship-node-cleanup /usr/local/bin/localship-logshipper /usr/local/bin/
# Non-root by default; the DaemonSet runs the provisioner as root with only
# DAC_OVERRIDE and FOWNER, because it must manage directories any pod wrote.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/localship-provisioner"]
