# Images of qmesh's two in-cluster binaries and of the CLI (for example workloads), from one
# multi-stage build:
#   docker build --target operator -t ghcr.io/qmesh/qmesh-operator:0.1.0 .
#   docker build --target sidecar  -t ghcr.io/qmesh/qmesh-sidecar:0.1.0 .
#   docker build --target example  -t ghcr.io/qmesh/qmesh-example:0.1.0 .
# The binaries are the ones `cargo build --release --locked` produces; the runtime image is
# distroless (glibc, CA certificates, no shell) and runs as the non-root user 65532.
# hack/images.sh builds the same images without Docker; tests/tests/images_match_dockerfile.rs
# checks the two against each other. `docker build .` without --target builds the last stage, the sidecar.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin qmesh-operator --bin qmesh-sidecar --bin qmesh

FROM gcr.io/distroless/cc-debian12:nonroot AS example
COPY --from=build /src/target/release/qmesh /usr/local/bin/qmesh
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/qmesh"]

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /src/target/release/qmesh-operator /usr/local/bin/qmesh-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/qmesh-operator"]

FROM gcr.io/distroless/cc-debian12:nonroot AS sidecar
COPY --from=build /src/target/release/qmesh-sidecar /usr/local/bin/qmesh-sidecar
USER 65532:65532
# Peer API, app gRPC, app HTTP, admin.
EXPOSE 7070 7071 7072 7073
# glibc's malloc gives a drained backlog's memory back to the system (docs/storage.md).
ENV MALLOC_ARENA_MAX=2 MALLOC_TRIM_THRESHOLD_=131072
ENTRYPOINT ["/usr/local/bin/qmesh-sidecar"]
