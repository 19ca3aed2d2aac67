#!/usr/bin/env bash
# A throw-away SSH server on loopback for a DVC SSH remote: its own host key, one client
# key, no passwords. For tests and trying the SSH remote out on one machine; a team uses
# its real storage host instead (README, "Team setup").
#
#   scripts/sshd_remote.sh start DIR [PORT]   # keys + sshd on 127.0.0.1:PORT (default 2222)
#   scripts/sshd_remote.sh stop DIR
#
# DIR gets host_ed25519 (the server's key), client_ed25519 (the key to give DVC),
# authorized_keys, known_hosts, sshd_config, sshd.pid and sshd.log. The login user is the
# one who runs the script. Needs Debian's openssh-server (apt-get install openssh-server).
set -euo pipefail

cmd=${1:-}
DIR=$(realpath -m "${2:-sshd-remote}")
PORT=${3:-${SSHD_PORT:-2222}}
SSHD=${SSHD:-/usr/sbin/sshd}

die() { echo "error: $*" >&2; exit 2; }

start() {
    [[ -x "$SSHD" ]] || die "no $SSHD: apt-get install openssh-server"
    mkdir -p "$DIR"
    chmod 700 "$DIR"
    [[ -f "$DIR/host_ed25519" ]] || ssh-keygen -q -t ed25519 -N "" -C adaround-sshd-host -f "$DIR/host_ed25519"
    [[ -f "$DIR/client_ed25519" ]] || ssh-keygen -q -t ed25519 -N "" -C adaround-dvc-client -f "$DIR/client_ed25519"
    cp "$DIR/client_ed25519.pub" "$DIR/authorized_keys"
    chmod 600 "$DIR/authorized_keys"
    echo "[127.0.0.1]:$PORT $(cut -d' ' -f1,2 "$DIR/host_ed25519.pub")" >"$DIR/known_hosts"
    cat >"$DIR/sshd_config" <<EOF
Port $PORT
ListenAddress 127.0.0.1
HostKey $DIR/host_ed25519
PidFile $DIR/sshd.pid
AuthorizedKeysFile $DIR/authorized_keys
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
MaxStartups 64
MaxSessions 64
Subsystem sftp internal-sftp
LogLevel VERBOSE
EOF
    [[ $(id -u) -ne 0 ]] || mkdir -p /run/sshd  # privilege separation directory
    if [[ -f "$DIR/sshd.pid" ]] && kill -0 "$(cat "$DIR/sshd.pid")" 2>/dev/null; then
        echo "sshd already runs on 127.0.0.1:$PORT"
    else
        "$SSHD" -f "$DIR/sshd_config" -E "$DIR/sshd.log" || die "sshd did not start: see $DIR/sshd.log"
        for _ in $(seq 1 100); do [[ -s "$DIR/sshd.pid" ]] && break; sleep 0.1; done
        [[ -s "$DIR/sshd.pid" ]] || die "sshd did not start: see $DIR/sshd.log"
    fi
    echo "sshd on 127.0.0.1:$PORT as $(id -un); key $DIR/client_ed25519, known hosts $DIR/known_hosts"
}

stop() {
    if [[ -f "$DIR/sshd.pid" ]]; then
        kill "$(cat "$DIR/sshd.pid")" 2>/dev/null || true
        rm -f "$DIR/sshd.pid"
    fi
    echo "stopped sshd of $DIR"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop DIR [PORT]" >&2; exit 2 ;;
esac
