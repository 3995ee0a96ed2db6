#!/usr/bin/env bash
# The seed procedure done by hand, as a minimal script an operator would write:
# one instance at a time, drain it in HAProxy, wait until it has no session left,
# edit the image in docker-compose.yml, pull, `up -d`, wait for /health, wait until
# HAProxy's own check sees it UP, put it back in rotation. No rollback, no preflight:
# `set -e` stops at the first error (and leaves that instance drained).
#
# Usage: seed_procedure.sh HOSTS_FILE IMAGE
#   HOSTS_FILE  one instance per line: NAME SSH_HOST SSH_PORT PROJECT_DIR HEALTH_URL
#               (NAME is also the server's name in the HAProxy backend)
# Environment:
#   LB_SOCKET   HAProxy admin socket (unix path, `stats socket ... level admin`)
#   LB_BACKEND  backend holding the servers
#   SSH_KEY, KNOWN_HOSTS  login key and pinned host keys (host keys are checked)
#   WAIT_SECONDS  bound on every wait (default 130: a Terrateam request lasts up to 120 s)
set -euo pipefail

hosts_file=$1
image=$2
wait_bound=${WAIT_SECONDS:-130}

lb() { echo "$*" | socat -t 5 stdio "UNIX-CONNECT:$LB_SOCKET"; }
# `show stat` is CSV: pxname,svname,qcur,qmax,scur,...
no_sessions() { [[ $(lb "show stat" | awk -F, -v b="$LB_BACKEND" -v s="$1" '$1 == b && $2 == s {print $5}') == 0 ]]; }
# `show servers state BACKEND`: be_id be_name srv_id srv_name srv_addr srv_op_state ... (2 = running)
lb_sees_up() { [[ $(lb "show servers state $LB_BACKEND" | awk -v s="$1" '$4 == s {print $6}') == 2 ]]; }
healthy() { curl -fsS -o /dev/null --max-time 2 "$1"; }

# Poll a check every 0.1 s until it passes; give up after wait_bound seconds.
wait_until() {
  local what=$1 deadline=$((SECONDS + wait_bound))
  shift
  until "$@"; do
    if ((SECONDS >= deadline)); then
      echo "timed out after ${wait_bound}s waiting for $what" >&2
      exit 1
    fi
    sleep 0.1
  done
}

while read -r name host port dir health; do
  [[ -z $name || $name == \#* ]] && continue
  echo "$(date +%T.%N | cut -c1-12) $name: drain"
  lb "set server $LB_BACKEND/$name state drain" >/dev/null
  wait_until "$name to finish its sessions" no_sessions "$name"
  echo "$(date +%T.%N | cut -c1-12) $name: edit, pull, up"
  # -n: keep the loop's stdin (the hosts file) away from ssh.
  ssh -n -i "$SSH_KEY" -p "$port" -o BatchMode=yes -o StrictHostKeyChecking=yes \
    -o UserKnownHostsFile="$KNOWN_HOSTS" "root@$host" \
    "cd '$dir' && sed -i 's|^\\( *image: *\\)[^ #]*|\\1$image|' docker-compose.yml \
     && docker-compose pull --quiet server && docker-compose up -d server"
  wait_until "$health to answer 2xx" healthy "$health"
  wait_until "HAProxy to see $name UP" lb_sees_up "$name"
  lb "set server $LB_BACKEND/$name state ready" >/dev/null
  echo "$(date +%T.%N | cut -c1-12) $name: back in rotation"
done <"$hosts_file"
