# fhir-export: multi-stage build, small non-root runtime image.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# The image ships a stripped binary (the local release profile keeps line tables for profiling).
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=true
# Dependencies first: this layer is rebuilt only when Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src src
COPY migrations migrations
COPY config config
# The placeholder build left newer timestamps behind; make sure the real sources win.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

# The runtime adds only the stripped binary, its default configuration and the CA bundle (TLS to
# Azure and Postgres): no packages. The binary checks its own health (`fhir-export health`).
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --user-group --home-dir /app fhir \
    && mkdir -p /app/data/exports && chown -R fhir:fhir /app
WORKDIR /app
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /src/target/release/fhir-export /usr/local/bin/fhir-export
COPY config/default.toml /app/config/default.toml
USER fhir
# Listening on every interface: `serve` refuses that with auth.mode = none unless
# FHIR_EXPORT_ALLOW_ANONYMOUS=true says an open API is intended (docker-compose.yml does).
ENV FHIR_EXPORT_LISTEN=0.0.0.0:8080 \
    FHIR_EXPORT_STORAGE_DIR=/app/data/exports
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["fhir-export", "health"]
ENTRYPOINT ["fhir-export"]
CMD ["serve"]
