#!/usr/bin/env bash
# provision.sh - make a Debian 12 or Ubuntu 24.04 machine (the workshop VM) ready for the workshop.
#
#   sudo bash vagrant/provision.sh          # what `vagrant up` and `vagrant provision` run in the VM
#
# 1. `bash workshop.sh setup`: the Debian packages, the virtualenv .venv, stages with its extras. The
#    README's commands install through the same script, so the VM and a learner's own machine are set
#    up alike (one source of truth).
# 2. A token for JupyterLab, made once and kept in $STAGES_CONFIG_DIR/jupyter.env (root only).
# 3. JupyterLab as the systemd service stages-jupyter, serving notebooks/ as root (the notebooks' kernel
#    features are privileged), and the address to open it at, token included.
# 4. `stages doctor`, which must pass: a machine it fails cannot run the workshop, so the provisioning
#    fails with it, loudly, rather than leave a VM that breaks halfway through a lesson.
#
# Running it again changes nothing that is right already: packages, the virtualenv, the token and the
# unit are kept, and a running JupyterLab is left alone unless its unit changed.
#
# Where systemd is not PID 1 (a container, a CI machine) there is no service to start: the script says
# so and starts nothing, unless STAGES_JUPYTER=background asks for JupyterLab as a background process.
#
# Environment:
#   STAGES_REPO          the repository (default: the directory above this script's)
#   STAGES_JUPYTER_IP    the address JupyterLab listens on (default 127.0.0.1; the Vagrantfile passes
#                        0.0.0.0, and its port forward admits only the host's 127.0.0.1)
#   STAGES_JUPYTER_PORT  its port (default 8888)
#   STAGES_HOST_PORT     the port in the address printed: the host's side of a forward (default: the same)
#   STAGES_JUPYTER       auto (default: a service where systemd runs, else nothing) | background | none
#   STAGES_CONFIG_DIR    where the token (and a background JupyterLab's pid and log) live (/etc/stages)
#   STAGES_SYSTEMD_DIR   where the unit file goes (/etc/systemd/system)
set -euo pipefail

say() { printf '\033[1m[provision]\033[0m %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

repo=${STAGES_REPO:-$(cd "$(dirname "$0")/.." && pwd)}
ip=${STAGES_JUPYTER_IP:-127.0.0.1}
port=${STAGES_JUPYTER_PORT:-8888}
host_port=${STAGES_HOST_PORT:-$port}
mode=${STAGES_JUPYTER:-auto}
config=${STAGES_CONFIG_DIR:-/etc/stages}
unit_dir=${STAGES_SYSTEMD_DIR:-/etc/systemd/system}
unit=stages-jupyter.service

[[ $(id -u) == 0 ]] || die "this needs root (apt-get, and JupyterLab runs the notebooks as root): sudo bash $0"
[[ -f $repo/workshop.sh ]] ||
    die "no workshop.sh in $repo: set STAGES_REPO to the repository's directory"
[[ $port =~ ^[0-9]+$ && $host_port =~ ^[0-9]+$ ]] ||
    die "STAGES_JUPYTER_PORT and STAGES_HOST_PORT must be port numbers (got '$port', '$host_port')"
case $mode in
    auto | background | none) ;;
    *) die "STAGES_JUPYTER is '$mode': use auto (the default), background or none" ;;
esac

# -- 1. the packages, the virtualenv, stages ---------------------------------------------------------
say "setting up $repo (bash workshop.sh setup)"
bash "$repo/workshop.sh" setup
jupyter=$repo/.venv/bin/jupyter
[[ -x $jupyter ]] || die "workshop.sh setup left no $jupyter: is jupyterlab missing from the test extra?"

# -- 2. the token -------------------------------------------------------------------------------------
env_file=$config/jupyter.env
install -d -m 0755 "$config"
if ! grep -qs '^JUPYTER_TOKEN=[0-9a-f]\{48\}$' "$env_file"; then
    say "making JupyterLab's token: $env_file"
    token=$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')
    (umask 077 && printf '%s\n' \
        "# JupyterLab's token for the stages workshop, made once by vagrant/provision.sh: keep it secret" \
        "JUPYTER_TOKEN=$token" >"$env_file.tmp")
    mv "$env_file.tmp" "$env_file"
fi
token=$(sed -n 's/^JUPYTER_TOKEN=//p' "$env_file")

# -- 3. JupyterLab --------------------------------------------------------------------------------------
# The token reaches JupyterLab as $JUPYTER_TOKEN (from the environment file), never on its command line,
# where every user of the machine could read it in ps. News and update checks are off: the workshop
# works offline.
command=("$jupyter" lab --allow-root --no-browser "--ip=$ip" "--port=$port"
         "--notebook-dir=$repo/notebooks" --LabApp.news_url=None
         --LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate)
# On cgroup v2 a cgroup that holds processes hands no controller down to child cgroups ("no internal
# processes", cgroups(7)), and notebook 03 makes its cgroups below its own: so JupyterLab, and the
# kernels it starts, leave the service's cgroup for the root cgroup, which the rule exempts.
cgroup_v2=false
[[ $(stat -fc %T /sys/fs/cgroup 2>/dev/null) == cgroup2fs ]] && cgroup_v2=true

unit_text() {
    local start="${command[*]}"
    if $cgroup_v2; then
        start="/bin/sh -c 'echo \$\$\$\$ > /sys/fs/cgroup/cgroup.procs && exec \"\$\$@\"' jupyter $start"
    fi
    cat <<EOF
# Written by $repo/vagrant/provision.sh; running it again rewrites this file.
[Unit]
Description=JupyterLab for the stages workshop (the notebooks, as root)
Documentation=file://$repo/vagrant/README.md
After=network.target

[Service]
Type=simple
EnvironmentFile=$env_file
WorkingDirectory=$repo/notebooks
ExecStart=$start
Restart=on-failure

[Install]
WantedBy=multi-user.target
EOF
}

# Whether JupyterLab answers on its port with this token, waiting up to $1 seconds.
answers() {
    "$repo/.venv/bin/python" - "http://127.0.0.1:$port/api/status" "$token" "$1" <<'EOF'
import sys, time, urllib.request
url, token, patience = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = time.monotonic() + patience
while True:
    try:
        request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(request, timeout=2) as response:
            sys.exit(0 if response.status == 200 else 1)
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.3)
EOF
}

systemd_runs=false
[[ -d /run/systemd/system ]] && systemd_runs=true   # sd_booted(3)
started=false
install -d -m 0755 "$unit_dir"
unit_changed=false
if ! unit_text | cmp -s - "$unit_dir/$unit"; then
    unit_text >"$unit_dir/$unit.tmp"
    mv "$unit_dir/$unit.tmp" "$unit_dir/$unit"
    unit_changed=true
    say "wrote $unit_dir/$unit"
else
    say "$unit_dir/$unit is up to date"
fi

if [[ $mode == none ]]; then
    say "STAGES_JUPYTER=none: JupyterLab not started"
elif $systemd_runs; then
    $unit_changed && systemctl daemon-reload
    systemctl enable --quiet "$unit"
    if $unit_changed || ! systemctl is-active --quiet "$unit"; then
        say "starting JupyterLab: systemctl restart $unit"
        systemctl restart "$unit"
    else
        say "JupyterLab is running already ($unit)"
    fi
    answers 90 || die "JupyterLab did not answer on port $port: see journalctl -u $unit"
    started=true
else
    pid1=$(cat /proc/1/comm 2>/dev/null || echo unknown)
    if [[ $mode == background ]]; then
        pid_file=$config/jupyter.pid
        pid=$(cat "$pid_file" 2>/dev/null || true)
        if [[ -n $pid ]] && grep -qs jupyter "/proc/$pid/cmdline" && answers 1; then
            say "JupyterLab is running already in the background (pid $pid)"
        else
            say "systemd is not running here (PID 1 is $pid1): starting JupyterLab in the background"
            # setsid: its own session, so it outlives this script; the token comes from the environment.
            # shellcheck source=/dev/null
            (set -a && . "$env_file" && cd "$repo/notebooks" &&
                exec setsid "${command[@]}" >"$config/jupyter.log" 2>&1 </dev/null) &
            echo $! >"$pid_file"
            answers 90 || die "JupyterLab did not answer on port $port: see $config/jupyter.log"
            say "stop it with: kill \$(cat $pid_file)"
        fi
        started=true
    else
        say "systemd is not running here (PID 1 is $pid1), so there is no service to start: JupyterLab" \
            "is not running. To start it in the background instead: STAGES_JUPYTER=background bash $0"
    fi
fi
if $started; then
    say "JupyterLab: open http://127.0.0.1:$host_port/lab?token=$token"
fi

# -- 4. the doctor ------------------------------------------------------------------------------------
say "stages doctor"
doctor=("$repo/.venv/bin/stages" doctor)
status=0
if $cgroup_v2; then
    # From the root cgroup, as the notebooks run (see above): a login's session cgroup holds processes.
    (echo "$BASHPID" >/sys/fs/cgroup/cgroup.procs && exec "${doctor[@]}") || status=$?
else
    "${doctor[@]}" || status=$?
fi
if ((status != 0)); then
    die "stages doctor failed (exit $status): this machine cannot run the workshop yet; fix what it lists above"
fi
say "done: the workshop is ready"
