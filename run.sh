#!/usr/bin/env bash
# edgeprobe's one entry point. Sets up everything it needs on a fresh Debian/Ubuntu machine.
#
#   ./run.sh test [pytest args...]   ruff check, mypy, then pytest (e.g. ./run.sh test -k localstack)
#   ./run.sh demo [args...]          edgeprobe demo: local mosquitto + influxd + agent + collector
#   ./run.sh bench [args...]         measurement-truth benchmarks (root; tests/benchmarks/truth.py)
#   ./run.sh bench perf [--quick]    performance benchmarks (tests/benchmarks/perf_*.py)
#
# Set-up: missing system packages are installed with apt-get when run as root (else the exact
# `sudo apt-get install` command is printed), a .venv is created in the repo, and the package is
# (re)installed into it whenever pyproject.toml is newer than the last install.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"

VENV=.venv
STAMP="$VENV/.edgeprobe-installed"

if [ -t 1 ]; then BOLD=$'\033[1m'; RESET=$'\033[0m'; else BOLD=; RESET=; fi
section() { printf '\n%s==> %s%s\n' "$BOLD" "$*" "$RESET"; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

usage() {
    cat <<'EOF'
usage: ./run.sh test [pytest args...]   lint, type-check and run the tests
       ./run.sh demo [args...]          run the local demo (edgeprobe demo)
       ./run.sh bench [args...]         accuracy benchmarks vs ping/curl/fping in a netns lab (root)
       ./run.sh bench perf [--quick] [--only LIST] [--profile]
                                        performance benchmarks (collector, agent, fleet, sharing)
       ./run.sh bench trace [--queries N] [--runs N]
                                        the trace probe vs traceroute on a routed netns lab (root)
EOF
}

# True if command $1 exists (sbin dirs included: they are often off a normal user's PATH).
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

# apt_install PKG...: install with apt-get as root, else stop with the command to run.
apt_install() {
    if [ "$(id -u)" -eq 0 ] && have apt-get; then
        section "Installing system packages: $*"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
    else
        die "missing system packages; install them with:
    sudo apt-get install -y $*
then run this again."
    fi
}

# pids_running BINARY CONFIG: pids of processes running BINARY with the config file CONFIG on their
# command line (a package's own daemon; the tests' and the demo's servers use configs of their own
# in temporary or --keep directories, so they never match).
pids_running() {
    local dir cmd
    for dir in /proc/[0-9]*; do
        cmd=$(tr '\0' ' ' <"$dir/cmdline" 2>/dev/null) || continue
        case "$cmd" in
            "$1 "*" $2" | "$1 "*" $2 "*) printf '%s\n' "${dir#/proc/}" ;;
        esac
    done
}

# stop_package_services NAME BINARY CONFIG...: the Debian packages enable and start their own daemon
# (influxdb: influxd on every interface, port 8086, without authentication; mosquitto: a broker on
# port 1883). edgeprobe's tests and demo start their own servers on free loopback ports and need
# neither, so the services these packages just installed are stopped and disabled: through systemd
# when it runs, else the package's init script (which stops the daemon of its own pid file), and any
# daemon still running with the package's config file gets SIGTERM.
stop_package_services() {
    local name binary config pids
    while [ $# -ge 3 ]; do
        name=$1 binary=$2 config=$3
        shift 3
        if have systemctl && [ -d /run/systemd/system ]; then
            systemctl disable --now "$name.service" >/dev/null 2>&1 || true
        else
            [ -x "/etc/init.d/$name" ] && { "/etc/init.d/$name" stop >/dev/null 2>&1 || true; }
            have update-rc.d && { update-rc.d "$name" disable >/dev/null 2>&1 || true; }
        fi
        pids=$(pids_running "$binary" "$config")
        if [ -n "$pids" ]; then
            # shellcheck disable=SC2086 # one pid a word
            kill $pids 2>/dev/null || true
        fi
        printf 'run.sh: stopped and disabled the %s service that the package enabled (edgeprobe starts its own %s on loopback)\n' \
            "$name" "$(basename "$binary")"
    done
}

ensure_system_packages() {
    local -a missing=()
    have python3 || missing+=(python3)
    have mosquitto || missing+=(mosquitto)
    have influxd || missing+=(influxdb)
    have ping || missing+=(iputils-ping)
    have curl || missing+=(curl)
    have fping || missing+=(fping)      # used by the benchmarks
    have openssl || missing+=(openssl)  # test certificates for MQTT over TLS
    have unbound || [ -x /usr/sbin/unbound ] || missing+=(unbound)  # a local DNS server for the dns probe's tests
    have traceroute || [ -x /usr/sbin/traceroute ] || missing+=(traceroute)  # the trace probe's reference (lab tests)
    have iptables || [ -x /usr/sbin/iptables ] || missing+=(iptables)  # the trace lab's silent router
    have ip || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || missing+=(iproute2)  # network namespaces: edgeprobe lab, the demo
    if [ ${#missing[@]} -gt 0 ]; then
        apt_install "${missing[@]}"
        local -a services=()
        case " ${missing[*]} " in *" influxdb "*) services+=(influxdb /usr/bin/influxd /etc/influxdb/influxdb.conf) ;; esac
        case " ${missing[*]} " in *" mosquitto "*) services+=(mosquitto /usr/sbin/mosquitto /etc/mosquitto/mosquitto.conf) ;; esac
        [ ${#services[@]} -eq 0 ] || stop_package_services "${services[@]}"
    fi
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "python3 >= 3.11 is needed, found $(python3 --version 2>&1)"
}

venv_ok() {
    [ -x "$VENV/bin/python" ] \
        && "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

# What the installed venv was made from: the pins, the project's metadata and the list of files in
# the packages (a strict editable install links each file, so a new module needs a reinstall).
install_fingerprint() {
    {
        cat pyproject.toml requirements.lock
        find src agent collector probes grafana -type f \( -name '*.py' -o -name '*.json' -o -name '*.yaml' \
            -o -name '*.yml' -o -name 'py.typed' \) -not -path '*/__pycache__/*' | LC_ALL=C sort
    } | sha256sum | cut -d' ' -f1
}

ensure_venv() {
    if ! venv_ok; then
        section "Creating $VENV"
        rm -rf "$VENV"
        if ! python3 -m venv "$VENV"; then
            # Debian ships venv/ensurepip separately from python3.
            rm -rf "$VENV"
            apt_install python3-venv
            python3 -m venv "$VENV"
        fi
    fi
    local want
    want=$(install_fingerprint)
    if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
        # Every version comes from requirements.lock (made by `uv pip compile`, see docs/testing.md);
        # a strict editable install lays a tree of links that mypy and other tools can read.
        section "Installing edgeprobe into $VENV (pip install -c requirements.lock -e '.[test]')"
        "$VENV/bin/python" -m pip install --disable-pip-version-check -q -c requirements.lock \
            --config-settings editable_mode=strict -e '.[test]'
        printf '%s\n' "$want" >"$STAMP"
    fi
}

cmd_test() {
    local -a failed=()
    local pytest_rc=0
    section "ruff check"
    "$VENV/bin/ruff" check . || failed+=("ruff check")
    section "mypy"
    "$VENV/bin/mypy" || failed+=(mypy)
    section "import-linter (layers)"
    "$VENV/bin/lint-imports" || failed+=(lint-imports)
    section "mkdocs build --strict"
    "$VENV/bin/mkdocs" build --strict --quiet --site-dir "$(mktemp -d)" || failed+=("mkdocs build")
    section "pytest"
    # Last, and nothing printed after it on success: pytest's own summary closes the output.
    "$VENV/bin/pytest" "$@" || pytest_rc=$?
    [ "$pytest_rc" -eq 0 ] || failed+=("pytest (exit $pytest_rc)")
    if [ ${#failed[@]} -gt 0 ]; then
        printf '\n%sFAILED:%s %s\n' "$BOLD" "$RESET" "$(IFS=,; echo "${failed[*]}")" >&2
        exit $((pytest_rc != 0 ? pytest_rc : 1))
    fi
}

cmd_bench() {
    if [ "${1:-}" = perf ]; then
        shift
        cmd_bench_perf "$@"
    fi
    if [ "${1:-}" = trace ]; then  # ./run.sh bench trace [--queries N] [--runs N]: tests/benchmarks/bench_trace.py
        shift
        exec "$VENV/bin/python" -m tests.benchmarks.bench_trace "$@"
    fi
    # Prints a table per benchmark; figures go to bench-results/truth.json (--out to change).
    exec "$VENV/bin/python" -m tests.benchmarks.truth "$@"
}

# ./run.sh bench perf [--quick] [--only codec,ingest,horizontal,freshness,fleet,agent] [--profile]
# Performance benchmarks 1-6 (tests/benchmarks/perf_*.py); each prints a table and writes
# bench-results/perf_<name>.json. Full run < 15 min, --quick < 2 min.
cmd_bench_perf() {
    local quick= profile= only=codec,ingest,horizontal,freshness,fleet,agent
    while [ $# -gt 0 ]; do
        case "$1" in
            --quick) quick=--quick ;;
            --profile) profile=--profile ;;
            --only) only="$2"; shift ;;
            --only=*) only="${1#--only=}" ;;
            *) die "bench perf: unknown argument $1" ;;
        esac
        shift
    done
    local py="$VENV/bin/python" ingest= fleet=
    for b in ${only//,/ }; do
        case "$b" in
            codec) "$py" -m tests.benchmarks.perf_codec $quick ;;
            ingest | horizontal) ingest="${ingest:+$ingest,}$b" ;;
            freshness | fleet) fleet="${fleet:+$fleet,}$b" ;;
            agent) ;;
            *) die "bench perf: unknown benchmark $b" ;;
        esac
    done
    [ -z "$ingest" ] || "$py" -m tests.benchmarks.perf_ingest $quick $profile --only "$ingest"
    [ -z "$fleet" ] || "$py" -m tests.benchmarks.perf_fleet $quick --only "$fleet"
    case ",$only," in *,agent,*) "$py" -m tests.benchmarks.perf_agent $quick $profile ;; esac
    exit 0
}

cmd_demo() {
    exec "$VENV/bin/edgeprobe" demo "$@"
}

main() {
    local cmd="${1:-}"
    case "$cmd" in
        test | demo | bench) shift ;;
        -h | --help | help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    ensure_system_packages
    ensure_venv
    "cmd_$cmd" "$@"
}

main "$@"
