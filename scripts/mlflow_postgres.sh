#!/usr/bin/env bash
# An MLflow tracking server backed by PostgreSQL, artifacts proxied to a local directory.
#
#   scripts/mlflow_postgres.sh start [DIR]   # PostgreSQL cluster + database + `mlflow server`
#   scripts/mlflow_postgres.sh stop [DIR]    # stops both (the data stays in DIR)
#   scripts/mlflow_postgres.sh status [DIR]  # exit 0 when both answer
#
# DIR (default: $MLFLOW_SERVER_DIR, else ./mlflow-server) holds pgdata/ (the cluster; see
# pg_root for root), artifacts/ (what clients upload through the server), the logs and pid files. Settings:
#   MLFLOW_PORT (5000)  MLFLOW_HOST (127.0.0.1; 0.0.0.0 for the team)  MLFLOW_WORKERS (2)
#   PG_PORT (5433)      PG_BIN (newest /usr/lib/postgresql/*/bin)      PG_USER (postgres, as root)
#   MLFLOW_ALLOWED_HOSTS (MLflow's --allowed-hosts: the names clients use, e.g.
#   tracking-host,tracking-host:5000; MLflow's default accepts localhost and private IPs)
# PostgreSQL listens on 127.0.0.1 only (trust auth for local connections): only the MLflow
# server, on the same host, talks to it (postgresql+psycopg2: SQLAlchemy 2.1 defaults to psycopg 3). Clients use MLFLOW_TRACKING_URI=http://HOST:PORT.
# uvicorn's 5 s worker health check kills workers still importing MLflow on a busy machine:
# it gets 120 s here. Needs Debian's `postgresql` package (apt-get install postgresql) and psycopg2-binary.
set -euo pipefail

cmd=${1:-}
DIR=$(realpath -m "${2:-${MLFLOW_SERVER_DIR:-mlflow-server}}")
MLFLOW_PORT=${MLFLOW_PORT:-5000}
MLFLOW_HOST=${MLFLOW_HOST:-127.0.0.1}
MLFLOW_WORKERS=${MLFLOW_WORKERS:-2}
PG_PORT=${PG_PORT:-5433}
PG_USER=${PG_USER:-postgres}
DB=mlflow
PYBIN=$(dirname "$(command -v python3)")
MLFLOW=${MLFLOW:-$PYBIN/mlflow}

die() { echo "error: $*" >&2; exit 2; }

pg_bin() {
    local found=${PG_BIN:-}
    [[ -n "$found" ]] ||
        found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    [[ -n "$found" && -x "$found/initdb" ]] ||
        die "PostgreSQL is not installed (no ${PG_BIN:-/usr/lib/postgresql/*/bin}/initdb): apt-get install postgresql"
    echo "$found"
}

# PostgreSQL refuses to run as root: as root, run its commands as $PG_USER.
as_pg() {
    if [[ $(id -u) -eq 0 ]]; then
        id "$PG_USER" >/dev/null 2>&1 || useradd --system --no-create-home "$PG_USER"
        (cd / && runuser -u "$PG_USER" -- "$@")
    else
        "$@"
    fi
}

# Where the cluster lives: DIR/pgdata, or, as root when PG_USER cannot reach DIR (a folder
# under /root or pytest's tmp), a folder of PG_USER's own under /var/tmp, noted in DIR/pgroot.
pg_root() {
    if [[ -f "$DIR/pgroot" ]]; then cat "$DIR/pgroot"; return; fi
    local root=$DIR
    if [[ $(id -u) -eq 0 ]] && ! runuser -u "$PG_USER" -- test -x "$DIR" 2>/dev/null; then
        root=/var/tmp/adaround-mlflow-pg-$(echo "$DIR" | md5sum | cut -c1-12)
    fi
    echo "$root" >"$DIR/pgroot"
    echo "$root"
}

mlflow_ok() { curl -fsS --max-time 3 "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null 2>&1; }
pg_ok() { "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; }

start() {
    command -v curl >/dev/null || die "curl is needed (apt-get install curl)"
    [[ -x "$MLFLOW" ]] || die "no mlflow at $MLFLOW (activate the project's .venv)"
    "$PYBIN/python3" -c "import psycopg2" 2>/dev/null ||
        die "psycopg2 is missing in $PYBIN: pip install psycopg2-binary (make setup does)"
    local bin; bin=$(pg_bin) || exit 2
    mkdir -p "$DIR/artifacts"
    if [[ $(id -u) -eq 0 ]]; then
        id "$PG_USER" >/dev/null 2>&1 || useradd --system --no-create-home "$PG_USER"
    fi
    local root; root=$(pg_root)
    mkdir -p "$root/pgdata" "$root/pgrun"  # the cluster; its socket and log
    [[ $(id -u) -ne 0 ]] || chown -R "$PG_USER" "$root/pgdata" "$root/pgrun"
    if [[ ! -f "$root/pgdata/PG_VERSION" ]]; then
        as_pg "$bin/initdb" -D "$root/pgdata" -U mlflow --auth=trust -E UTF8 \
            >"$DIR/initdb.log" 2>&1 || die "initdb failed: see $DIR/initdb.log"
    fi
    if ! pg_ok; then
        as_pg "$bin/pg_ctl" -D "$root/pgdata" -l "$root/pgrun/postgres.log" -w -t 60 start \
            -o "-p $PG_PORT -k $root/pgrun -c listen_addresses=127.0.0.1 -c max_connections=200" \
            >/dev/null || die "PostgreSQL did not start on port $PG_PORT: see $root/pgrun/postgres.log"
    fi
    if ! as_pg "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U mlflow -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname='$DB'" | grep -q 1; then
        as_pg "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U mlflow "$DB"
    fi
    if mlflow_ok; then
        echo "MLflow already answers on port $MLFLOW_PORT"
    else
        local backend="postgresql+psycopg2://mlflow@127.0.0.1:$PG_PORT/$DB"
        MLFLOW_DISABLE_TELEMETRY=true setsid nohup "$MLFLOW" server --backend-store-uri "$backend" \
            --artifacts-destination "$DIR/artifacts" --serve-artifacts \
            --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
            --uvicorn-opts "--timeout-worker-healthcheck 120" \
            ${MLFLOW_ALLOWED_HOSTS:+--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"} \
            >"$DIR/mlflow.log" 2>&1 &
        echo $! >"$DIR/mlflow.pid"  # its own process group: the server and its workers
        for _ in $(seq 1 360); do  # the first start creates the tables (a minute on 2 busy cores)
            mlflow_ok && break
            kill -0 "$(cat "$DIR/mlflow.pid")" 2>/dev/null ||
                die "mlflow server exited: see $DIR/mlflow.log"
            sleep 0.5
        done
        mlflow_ok || die "mlflow server did not answer on port $MLFLOW_PORT in 180 s: see $DIR/mlflow.log"
    fi
    echo "MLflow on PostgreSQL: MLFLOW_TRACKING_URI=http://$MLFLOW_HOST:$MLFLOW_PORT" \
        "(database 127.0.0.1:$PG_PORT/$DB, artifacts $DIR/artifacts)"
}

stop() {
    [[ -d "$DIR" ]] || { echo "nothing to stop: no $DIR"; return; }
    if [[ -f "$DIR/mlflow.pid" ]]; then
        local pid; pid=$(cat "$DIR/mlflow.pid")
        if kill -0 -- "-$pid" 2>/dev/null; then
            kill -TERM -- "-$pid" 2>/dev/null || true
            for _ in $(seq 1 40); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.25; done
            kill -KILL -- "-$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/mlflow.pid"
    fi
    local root; root=$(pg_root)
    if [[ -f "$root/pgdata/postmaster.pid" ]]; then
        as_pg "$(pg_bin)/pg_ctl" -D "$root/pgdata" -m fast -w stop >/dev/null || true
    fi
    echo "stopped the MLflow server and PostgreSQL of $DIR"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) pg_ok && mlflow_ok ;;
    *) echo "usage: $0 start|stop|status [DIR]" >&2; exit 2 ;;
esac
