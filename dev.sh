#!/bin/sh
# The README's two commands. Needs nothing but python3 (3.11 or newer):
#   ./dev.sh demo            run `patgate demo` (embedded PostgreSQL, echo upstream, seeded tokens)
#   ./dev.sh test [ARGS]     lint, type-check and run the whole test suite (ARGS go to pytest)
#   ./dev.sh bench [ARGS]    patgate against nginx with wrk (python -m bench; see BENCHMARKS.md)
# Each creates .venv on first use and installs what it needs into it.
set -eu
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "dev.sh: patgate needs Python 3.11 or newer ($PYTHON is $("$PYTHON" -V 2>&1))" >&2
    exit 2
}

install() {
    if [ ! -x .venv/bin/python ]; then
        "$PYTHON" -m venv .venv
    fi
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$1]"
}

# Debian packages the tests drive (nginx for the forward-auth comparison), installed when
# missing and we may (root with apt-get, as in CI); otherwise those tests skip and say why.
debian_packages() {
    missing=""
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] ||
            missing="$missing ${pair#*:}"
    done
    [ -n "$missing" ] || return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "dev.sh: installing$missing" >&2
        # shellcheck disable=SC2086 # word splitting is the point
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null ||
            { apt-get update -q >/dev/null &&
                DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null; }
    else
        echo "dev.sh: not installing$missing (needs root and apt-get); those tests will skip" >&2
    fi
}

case "${1:-}" in
demo)
    shift
    install embedded
    exec .venv/bin/patgate demo "$@"
    ;;
test)
    shift
    install test
    debian_packages nginx:nginx-light chromium:chromium
    .venv/bin/ruff check gateway tests
    .venv/bin/ruff format --check gateway tests
    .venv/bin/mypy
    exec .venv/bin/pytest "$@"
    ;;
bench)
    shift
    install bench
    exec .venv/bin/python -m bench "$@"
    ;;
*)
    echo "usage: ./dev.sh demo | ./dev.sh test [pytest arguments] | ./dev.sh bench [options]" >&2
    exit 2
    ;;
esac
