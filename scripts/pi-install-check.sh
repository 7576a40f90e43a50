#!/usr/bin/env bash
# Rehearse the README's Raspberry Pi install in a temp directory, as far as a machine without systemd running
# allows. The install commands are taken from README.md ("Raspberry Pi install", the block that installs into
# /opt/piagent) and run as written, except: no sudo, /opt/piagent and /etc/piagent are moved under the temp
# directory, and the lines for systemctl and /etc/systemd are left out (this machine's systemd is not used).
# They run in a copy of the project folder whose piagent.env has two edits a user might make (PORT, and
# OLLAMA_HOST pointing at fake_ollama.py on loopback, so the README's --check line can pass).
# Then: render the unit for those paths, check it with systemd-analyze (verify, and security exposure <= 2.0),
# start piagent exactly as the unit's ExecStart would, with its Environment= and EnvironmentFile= (read with
# systemd's rules for the subset piagent.env uses) and the STATE_DIRECTORY that StateDirectory= provides, and
# check /health and that the SQLite memory file appears. Between the two, step 3 runs again as "To update" says.
# Loopback only; everything is removed at the end.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=$(mktemp -d)
pid=""
fake_pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null
  [ -n "$fake_pid" ] && kill "$fake_pid" 2>/dev/null
  rm -rf "$root"
}
trap cleanup EXIT
step() { printf '%s\n' "-- $*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

step "take the install commands from README.md"
python3 - "$here/README.md" > "$root/install.sh" <<'EOF'
import re, shlex, sys
readme = open(sys.argv[1], encoding="utf-8").read()
section = readme.split("## Raspberry Pi install", 1)[1].split("\n## ", 1)[0]
(block,) = [b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if "/opt/piagent/.venv" in b]
print("set -euo pipefail")
for line in block.splitlines():
    if line.startswith("cd ") or "systemctl" in line or "/etc/systemd" in line:
        continue
    line = re.sub(r"(^|&& )sudo ", r"\1", line)  # each command's sudo, also after &&
    line = line.replace("/opt/piagent", "$ROOT/opt/piagent").replace("/etc/piagent", "$ROOT/etc/piagent")
    print("echo " + shlex.quote("+ " + line))
    print(line)
EOF
grep -q 'compileall' "$root/install.sh" || { cat "$root/install.sh"; echo "no install commands found in README.md"; exit 1; }

step "a copy of the project folder, with PORT and OLLAMA_HOST set in piagent.env"
mkdir -p "$root/src" "$root/var/lib/piagent"
cp "$here"/piagent.py "$here"/requirements.txt "$here"/README.md "$here"/piagent.env "$here"/piagent.service \
   "$here"/fake_ollama.py "$root/src/"
# the tests pass two ports that no other test's server can be given meanwhile (test_piagent.free_port)
read -r port fake_port <<< "${REHEARSAL_PORTS:-$(free_port) $(free_port)}"
sed -i "s/^PORT=.*/PORT=$port/; s#^OLLAMA_HOST=.*#OLLAMA_HOST=http://127.0.0.1:$fake_port#" "$root/src/piagent.env"
python3 "$root/src/fake_ollama.py" --port "$fake_port" > "$root/fake.log" 2>&1 &
fake_pid=$!
for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$fake_port/api/version" >/dev/null 2>&1; then break; fi
  kill -0 "$fake_pid" 2>/dev/null || { cat "$root/fake.log"; echo "fake Ollama exited"; exit 1; }
  sleep 0.1
done

step "run the README's install commands"
(cd "$root/src" && ROOT="$root" PIP_DISABLE_PIP_VERSION_CHECK=1 bash "$root/install.sh") > "$root/install.log" 2>&1 \
  || { tail -n 40 "$root/install.log"; echo "the README's install commands failed"; exit 1; }
grep -q '^✓ agent general' "$root/install.log" || { tail -n 40 "$root/install.log"; echo "--check did not pass"; exit 1; }
echo "--check passed"
[ "$(stat -c %a "$root/etc/piagent/piagent.env")" = 600 ] || { echo "piagent.env (keys go in it) is readable by others"; exit 1; }
[ -f "$root/opt/piagent/__pycache__/piagent.cpython-$(python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")').pyc" ] \
  || { echo "no compiled bytecode"; exit 1; }

step "update as README.md's 'To update' says: with piagent stopped, step 3 again, but its venv and piagent.env lines"
grep -q "To update: \`sudo systemctl stop piagent\`" "$here/README.md" \
  && grep -q "minus its \`python3 -m venv\` and \`cp piagent.env\` lines" "$here/README.md" \
  || { echo "README.md's 'To update' no longer says what this rehearses"; exit 1; }
echo "# my own settings" >> "$root/etc/piagent/piagent.env"
grep -v -e 'cp piagent.env' -e 'python3 -m venv' "$root/install.sh" > "$root/update.sh"
grep -q 'pip install' "$root/update.sh" || { cat "$root/update.sh"; echo "no pip line left to update with"; exit 1; }
(cd "$root/src" && ROOT="$root" PIP_DISABLE_PIP_VERSION_CHECK=1 bash "$root/update.sh") > "$root/update.log" 2>&1 \
  || { tail -n 40 "$root/update.log"; echo "the update failed"; exit 1; }
grep -q '^✓ agent general' "$root/update.log" || { tail -n 40 "$root/update.log"; echo "--check after the update"; exit 1; }
grep -qx '# my own settings' "$root/etc/piagent/piagent.env" || { echo "the update overwrote the settings"; exit 1; }
echo "update passed"

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
