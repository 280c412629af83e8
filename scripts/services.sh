#!/usr/bin/env bash
# Start the external services that the rlft test-suite needs on a fresh Debian machine (run as root):
#   * PostgreSQL (for tests/label against a real server),
#   * headless Chromium + chromedriver (for the labeling-UI browser test),
#   * bubblewrap (the code sandbox, rlft/rl/sandbox.py: without it untrusted programs are refused, not run).
#
# Usage (what .ci/run does):   eval "$(bash scripts/services.sh)"
#
# Only `export NAME=value` lines go to stdout, so the output can be eval'ed; progress goes to stderr.
# Idempotent: packages already installed are not re-fetched, a running cluster is reused, and the role/database
# are created only when missing. Override names with RLFT_PG_USER / RLFT_PG_PASSWORD / RLFT_PG_DB.
set -euo pipefail

PG_USER="${RLFT_PG_USER:-rlft}"
PG_PASSWORD="${RLFT_PG_PASSWORD:-rlft}"
PG_DB="${RLFT_PG_DB:-rlft_test}"
PACKAGES=(postgresql chromium chromium-driver bubblewrap util-linux mount)

log() { echo "[services] $*" >&2; }

if [[ "$(id -u)" != "0" ]]; then
    log "must run as root (installs Debian packages and starts PostgreSQL)"
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
else
    log "packages already installed: ${PACKAGES[*]}"
fi

# One cluster is enough; take the newest installed server version.
PG_VERSION="$(ls /usr/lib/postgresql | sort -V | tail -n1)"
if ! pg_lsclusters -h | awk '{print $1, $2}' | grep -q "^${PG_VERSION} main$"; then
    log "creating cluster ${PG_VERSION}/main"
    pg_createcluster "$PG_VERSION" main >&2
fi
PG_PORT="$(pg_lsclusters -h | awk -v v="$PG_VERSION" '$1 == v && $2 == "main" {print $3}')"
if ! pg_lsclusters -h | awk -v v="$PG_VERSION" '$1 == v && $2 == "main" {print $4}' | grep -q online; then
    log "starting PostgreSQL ${PG_VERSION}/main on port ${PG_PORT}"
    # pg_ctlcluster drops to the cluster owner itself: postgres refuses to run as root.
    pg_ctlcluster "$PG_VERSION" main start >&2
fi

as_postgres() { runuser -u postgres -- psql -p "$PG_PORT" -v ON_ERROR_STOP=1 -qtA "$@"; }
for _ in $(seq 1 30); do as_postgres -c "select 1" >/dev/null 2>&1 && break; sleep 0.5; done

if [[ "$(as_postgres -c "select 1 from pg_roles where rolname = '${PG_USER}'")" != "1" ]]; then
    log "creating role ${PG_USER}"
    as_postgres -c "create role \"${PG_USER}\" login password '${PG_PASSWORD}' createdb" >&2
fi
if [[ "$(as_postgres -c "select 1 from pg_database where datname = '${PG_DB}'")" != "1" ]]; then
    log "creating database ${PG_DB}"
    as_postgres -c "create database \"${PG_DB}\" owner \"${PG_USER}\"" >&2
fi

echo "export RLFT_TEST_POSTGRES_URL=postgresql+psycopg://${PG_USER}:${PG_PASSWORD}@127.0.0.1:${PG_PORT}/${PG_DB}"
echo "export RLFT_TEST_CHROMIUM=$(command -v chromium)"
echo "export RLFT_TEST_CHROMEDRIVER=$(command -v chromedriver)"
echo "export RLFT_TEST_BWRAP=$(command -v bwrap)"
log "ready"
