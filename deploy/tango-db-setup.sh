#!/usr/bin/env bash
# A local Tango database (MariaDB + Debian's DataBaseds) for development and CI: the steps .ci/run takes.
#
#   sudo deploy/tango-db-setup.sh            # install (Debian/Ubuntu), start, create; safe to run again
#   export TANGO_HOST=127.0.0.1:10000        # then: make test (runs the real-database integration test)
#   sudo deploy/tango-db-setup.sh --stop     # stop DataBaseds and MariaDB started by this script
#
# Works without an init system (containers, CI): MariaDB runs under mysqld_safe, DataBaseds under nohup.
# Environment: TANGO_DB_PORT (10000), MYSQL_USER (tango), MYSQL_PASSWORD (tango),
# TANGO_DB_STATE (/var/tmp/defectscope-tango-db: logs and pid files), TANGO_DB_NO_INSTALL=1 (skip apt-get).
# For a facility database use your site's procedure; this one is for a developer's machine only.
set -euo pipefail

PORT="${TANGO_DB_PORT:-10000}"
export MYSQL_USER="${MYSQL_USER:-tango}"
export MYSQL_PASSWORD="${MYSQL_PASSWORD:-tango}"
export MYSQL_HOST="${MYSQL_HOST:-localhost}"   # localhost: the Unix socket, no TCP port for MariaDB needed
STATE="${TANGO_DB_STATE:-/var/tmp/defectscope-tango-db}"
DATABASEDS=/usr/lib/tango/DataBaseds
INSTALL_SQL=/usr/share/dbconfig-common/data/tango-db/install/mysql   # sources the tables + stored procedures
SOCKET=/run/mysqld/mysqld.sock

say() { echo "tango-db-setup: $*" >&2; }
die() { say "error: $*"; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

stop() {
    for name in databaseds mysqld_safe; do
        if [[ -f "$STATE/$name.pid" ]] && kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null; then
            say "stopping $name (pid $(cat "$STATE/$name.pid"))"
            if [[ $name == mysqld_safe ]]; then mysqladmin --protocol=socket -uroot shutdown || true
            else kill "$(cat "$STATE/$name.pid")"; fi
        fi
        rm -f "$STATE/$name.pid"
    done
}

install_packages() {
    [[ -x $DATABASEDS && -x "$(command -v mysqld_safe || true)" ]] && return 0
    [[ ${TANGO_DB_NO_INSTALL:-0} == 1 ]] && die "mariadb-server/tango-db are not installed and TANGO_DB_NO_INSTALL=1"
    [[ $(id -u) == 0 ]] || die "installing mariadb-server and tango-db needs root (sudo $0)"
    command -v apt-get >/dev/null || die "no apt-get: install MariaDB and Tango's DataBaseds by hand"
    export DEBIAN_FRONTEND=noninteractive
    # dbconfig-common would try to reach a MariaDB that is not running yet; we create the database below.
    echo "tango-db tango-db/dbconfig-install boolean false" | debconf-set-selections
    for attempt in 1 2 3; do  # the package mirror is the only network we have: retry a flaky one
        if apt-get update -qq && apt-get install -y -qq --no-install-recommends mariadb-server mariadb-client tango-db; then
            return 0
        fi
        say "apt-get failed (attempt $attempt), retrying"; sleep $((attempt * 5))
    done
    die "could not install mariadb-server tango-db"
}

start_mariadb() {
    if mysqladmin --protocol=socket -uroot ping >/dev/null 2>&1; then say "MariaDB already running"; return 0; fi
    install -d -o mysql -g mysql /run/mysqld
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        say "initialising the MariaDB data directory"
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$STATE/mariadb-install.log" 2>&1
    fi
    say "starting MariaDB (mysqld_safe, log $STATE/mariadb.log)"
    install -o mysql -g mysql -m 640 /dev/null "$STATE/mariadb.log"  # mariadbd writes it as user mysql
    nohup setsid mysqld_safe --user=mysql --bind-address=127.0.0.1 --socket="$SOCKET" \
        --log-error="$STATE/mariadb.log" >/dev/null 2>&1 &
    echo $! >"$STATE/mysqld_safe.pid"
    for _ in $(seq 120); do
        mysqladmin --protocol=socket -uroot ping >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    tail -n 20 "$STATE/mariadb.log" >&2 || true
    die "MariaDB did not start within 60 s"
}

create_database() {
    local sql=(mysql --protocol=socket -uroot --batch --skip-column-names)
    if [[ $("${sql[@]}" -e "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema='tango' AND table_name='device'") == 1 ]]; then
        say "database 'tango' exists"
    else
        [[ -f $INSTALL_SQL ]] || die "$INSTALL_SQL missing (is tango-db installed?)"
        say "creating database 'tango' from $INSTALL_SQL"
        "${sql[@]}" -e "CREATE DATABASE IF NOT EXISTS tango"
        (cd /usr/share/tango-db && "${sql[@]}" tango <"$INSTALL_SQL")
    fi
    # The account DataBaseds uses (re-run safe: the password is reset to MYSQL_PASSWORD).
    "${sql[@]}" <<SQL
CREATE USER IF NOT EXISTS '$MYSQL_USER'@'localhost' IDENTIFIED BY '$MYSQL_PASSWORD';
ALTER USER '$MYSQL_USER'@'localhost' IDENTIFIED BY '$MYSQL_PASSWORD';
GRANT ALL PRIVILEGES ON tango.* TO '$MYSQL_USER'@'localhost';
FLUSH PRIVILEGES;
SQL
}

start_databaseds() {
    if port_open "$PORT"; then say "something already listens on 127.0.0.1:$PORT (DataBaseds from an earlier run?)"; return 0; fi
    say "starting DataBaseds on 127.0.0.1:$PORT (log $STATE/databaseds.log)"
    TANGO_HOST="127.0.0.1:$PORT" nohup setsid "$DATABASEDS" 2 -ORBendPoint "giop:tcp:127.0.0.1:$PORT" \
        >"$STATE/databaseds.log" 2>&1 &
    echo $! >"$STATE/databaseds.pid"
    for _ in $(seq 60); do
        if grep -q "Ready to accept request" "$STATE/databaseds.log" 2>/dev/null; then return 0; fi
        kill -0 "$(cat "$STATE/databaseds.pid")" 2>/dev/null || break
        sleep 0.5
    done
    tail -n 20 "$STATE/databaseds.log" >&2 || true
    die "DataBaseds did not become ready"
}

mkdir -p "$STATE"
if [[ ${1:-} == --stop ]]; then stop; exit 0; fi
install_packages
start_mariadb
create_database
start_databaseds
say "ready: export TANGO_HOST=127.0.0.1:$PORT"
echo "TANGO_HOST=127.0.0.1:$PORT"
