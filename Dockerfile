# One image with every rackscale binary: rackscale-operator, rackscale-agent,
# rackscale-engine and the rackscale CLI (the Helm chart runs all of them
# from it). Multi-stage: a Rust builder, then a slim Debian runtime running
# as a non-root user.
#
#   docker build -t rackscale:dev .
#
# Build args: RUST_VERSION (the workspace needs 1.90 or newer), CARGO_FEATURES
# (e.g. "agent/nvml" for NVML GPU discovery in the agent).

ARG RUST_VERSION=1.90
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
# etcd-client compiles etcd's .proto files with protoc at build time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ARG CARGO_FEATURES=""
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins ${CARGO_FEATURES:+--features "$CARGO_FEATURES"} \
    && mkdir -p /out \
    && cp target/release/rackscale target/release/rackscale-operator \
          target/release/rackscale-agent target/release/rackscale-engine /out/

FROM debian:${DEBIAN_RELEASE}-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 rackscale \
    && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin rackscale
COPY --from=builder /out/ /usr/local/bin/
USER 65532:65532
# The operator's /metrics; the agent's gRPC and /metrics; the frontend.
EXPOSE 8080 7400 7401 8000
ENTRYPOINT []
CMD ["rackscale", "--help"]
