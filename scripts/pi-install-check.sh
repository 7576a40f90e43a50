#!/usr/bin/env bash
# Rehearse the README's Raspberry Pi install in a temp directory, as far as a machine without systemd running
# allows: copy the files to <tmp>/opt/piagent and <tmp>/etc/piagent, create the venv, install requirements,
# render the unit for those paths, check it with systemd-analyze (verify, and security exposure <= 2.0), then
# start piagent exactly as the unit's ExecStart would, with its Environment= and EnvironmentFile= (read with
# systemd's rules for the subset piagent.env uses) and the STATE_DIRECTORY that StateDirectory= provides,
# and check /health and that the SQLite memory file appears. Loopback only; everything is removed at the end.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$root"; }
trap cleanup EXIT
step() { printf '%s\n' "-- $*"; }

step "copy files to $root/opt/piagent and $root/etc/piagent"
mkdir -p "$root/opt/piagent" "$root/etc/piagent" "$root/var/lib/piagent"
cp "$here/piagent.py" "$here/requirements.txt" "$here/README.md" "$root/opt/piagent/"
cp "$here/piagent.env" "$root/etc/piagent/piagent.env"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
sed -i "s/^PORT=.*/PORT=$port/" "$root/etc/piagent/piagent.env"   # the one edit a user might make

step "create the venv and install requirements.txt"
python3 -m venv "$root/opt/piagent/.venv"
"$root/opt/piagent/.venv/bin/pip" install -q --disable-pip-version-check -r "$root/opt/piagent/requirements.txt"
"$root/opt/piagent/.venv/bin/python" -m compileall -q "$root/opt/piagent"   # the service cannot write bytecode
[ -f "$root/opt/piagent/__pycache__/piagent.cpython-$(python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")').pyc" ] \
  || { echo "no compiled bytecode"; exit 1; }

step "render the unit for these paths and check it"
unit="$root/piagent.service"
sed "s#/opt/piagent#$root/opt/piagent#g; s#/etc/piagent#$root/etc/piagent#g" "$here/piagent.service" > "$unit"
out=$(systemd-analyze verify --man=no "$unit" 2>&1) || { echo "$out"; exit 1; }
[ -z "$out" ] || { echo "systemd-analyze verify: $out"; exit 1; }
exposure=$(systemd-analyze security --offline=true "$unit" 2>&1 | sed -n 's/.*Overall exposure level for piagent.service: \([0-9.]*\).*/\1/p')
python3 -c "import sys; e = float('$exposure'); print(f'exposure {e}'); sys.exit(0 if e <= 2.0 else 1)"

step "start piagent as ExecStart would, with the unit's environment"
env_args=()
for assignment in $(sed -n 's/^Environment=//p' "$unit"); do env_args+=("$assignment"); done
env_file=$(sed -n 's/^EnvironmentFile=-\{0,1\}//p' "$unit")
while IFS= read -r line || [ -n "$line" ]; do          # systemd's EnvironmentFile= rules, piagent.env's subset
  case "$line" in ''|'#'*) continue ;; esac
  key=${line%%=*}; value=${line#*=}
  case "$value" in \"*\"|\'*\') value=${value:1:${#value}-2} ;; esac
  env_args+=("$key=$value")
done < "$env_file"
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
workdir=$(sed -n 's/^WorkingDirectory=//p' "$unit")
# shellcheck disable=SC2086  # ExecStart is split on spaces, as systemd does for this unquoted line
(cd "$workdir" && exec env -i PATH=/usr/bin:/bin STATE_DIRECTORY="$root/var/lib/piagent" "${env_args[@]}" $exec_start) \
  > "$root/piagent.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then break; fi
  kill -0 "$pid" 2>/dev/null || { cat "$root/piagent.log"; echo "piagent exited"; exit 1; }
  sleep 0.1
done
health=$(curl -fsS "http://127.0.0.1:$port/health")
[ "$health" = '{"status":"ok"}' ] || { cat "$root/piagent.log"; echo "unexpected /health: $health"; exit 1; }
[ -f "$root/var/lib/piagent/piagent.db" ] || { echo "no SQLite memory in the state directory"; exit 1; }
echo "OK: /health answered on port $port; memory at $root/var/lib/piagent/piagent.db"
