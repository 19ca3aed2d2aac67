#!/usr/bin/env bash
# Installs the Debian packages the team-setup tests start themselves: PostgreSQL (MLflow's
# database, scripts/mlflow_postgres.sh) and openssh-server (the DVC SSH remote,
# scripts/sshd_remote.sh). Does nothing when they are there; needs root (or sudo) for apt.
# The services themselves are started and stopped by the tests' fixtures.
set -euo pipefail

missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
[[ -x /usr/sbin/sshd ]] || missing+=(openssh-server)
command -v ssh-keygen >/dev/null || missing+=(openssh-client)
command -v curl >/dev/null || missing+=(curl)
command -v runuser >/dev/null || missing+=(util-linux)
if ((${#missing[@]} == 0)); then
    exit 0
fi
sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo -n)
echo "installing ${missing[*]} (Debian packages of the team-setup tests)"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# the packages' own services are not used (each test starts its own on free ports)
if command -v service >/dev/null && [[ ! -d /run/systemd/system ]]; then
    "${sudo[@]}" service postgresql stop >/dev/null 2>&1 || true
    "${sudo[@]}" service ssh stop >/dev/null 2>&1 || true
fi
