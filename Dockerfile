# walhook container image: `docker build -t walhook .`
# Build stage: the release binary (dependencies cached in their own layer).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY benches benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --no-default-features --bin walhook \
    && rm -rf src target/release/.fingerprint/walhook-*
COPY src src
COPY sql sql
COPY config config
COPY docs docs
# The production binary: without the demo's throwaway CA and cluster (feature `demo`).
RUN cargo build --release --locked --no-default-features --bin walhook && strip target/release/walhook

# Runtime stage: glibc and CA certificates, nothing else; runs as a non-root user.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/walhook /usr/local/bin/walhook
COPY config/walhook.example.toml /etc/walhook/walhook.example.toml
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/walhook"]
CMD ["run", "--config", "/etc/walhook/walhook.toml"]
