# syntax=docker/dockerfile:1
#
# rlsgate in a small runtime image:
#
#   docker build -t rlsgate .
#   docker run -v "$PWD/rlsgate.toml:/etc/rlsgate/rlsgate.toml:ro" -e RLSGATE_CLAIMS_KEY -p 6432:6432 rlsgate
#
# The default command serves /etc/rlsgate/rlsgate.toml; any other subcommand
# runs in its place (`docker run --rm rlsgate init-db --help`).

# ---- build ------------------------------------------------------------------
# The full Rust image brings gcc and make, which is all aws-lc-sys (the
# crypto behind rustls and jsonwebtoken) needs: it compiles its C sources
# with the cc crate and ships pregenerated bindings for Linux, so neither
# cmake nor clang is required.
FROM rust:1-bookworm AS build
WORKDIR /src

# Dependencies first, built against placeholder sources, so that a change
# under src/ reuses this layer instead of recompiling every crate.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

COPY src ./src
# COPY keeps the sources' modification times, which may be older than the
# placeholder build above: touch the crate roots so that cargo rebuilds them.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && install -D -m 0755 target/release/rlsgate /out/rlsgate

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim

# Only the CA certificates: identity providers' keys are fetched over HTTPS
# and verified against the system's roots.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# An unprivileged user with a fixed id. /keys belongs to it so that a named
# volume mounted there (the development key in docker-compose.yml) starts out
# writable by it: Docker gives a new volume the owner of the image's directory.
RUN groupadd --system --gid 10001 rlsgate \
 && useradd --system --uid 10001 --gid rlsgate --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin rlsgate \
 && mkdir -p /etc/rlsgate /keys \
 && chown rlsgate:rlsgate /keys

COPY --from=build /out/rlsgate /usr/local/bin/rlsgate

USER 10001:10001
EXPOSE 6432
ENTRYPOINT ["rlsgate"]
CMD ["serve", "--config", "/etc/rlsgate/rlsgate.toml"]
