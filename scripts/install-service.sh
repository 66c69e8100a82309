#!/usr/bin/env bash
# Install fastinfer as a systemd service. Idempotent: run it again after an upgrade.
#
#   sudo scripts/install-service.sh [--enable] [--bin PATH] [--root DIR]
#
# Creates the system user "fastinfer", /etc/fastinfer/config.toml (a copy of scripts/config.toml,
# only if absent: an existing configuration is never overwritten), the model store
# /var/lib/fastinfer/models, and installs fastinfer.service and the
# fastinfer-{http,management,binary}.socket units into /etc/systemd/system, then runs
# `systemctl daemon-reload`.
#
#   --enable    also `systemctl enable --now` the three sockets and the service
#   --bin PATH  the fastinfer executable for ExecStart= (default /usr/local/bin/fastinfer;
#               e.g. /opt/fastinfer/venv/bin/fastinfer)
#   --root DIR  install into DIR instead of / (packaging, tests): no user is created, nothing
#               is chowned, systemctl is not called. DESTDIR=DIR in the environment does the same.

set -euo pipefail

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; }

root="${DESTDIR:-}"
enable=0
bin=/usr/local/bin/fastinfer
while [ $# -gt 0 ]; do
    case "$1" in
        --enable) enable=1 ;;
        --bin) bin="${2:?--bin needs a path}"; shift ;;
        --bin=*) bin="${1#*=}" ;;
        --root | --prefix) root="${2:?$1 needs a directory}"; shift ;;
        --root=* | --prefix=*) root="${1#*=}" ;;
        -h | --help) usage; exit 0 ;;
        *) echo "install-service.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
root="${root%/}"  # "" means the running system
case "$bin" in
    /*) ;;
    *) echo "install-service.sh: --bin must be an absolute path, got: $bin" >&2; exit 2 ;;
esac

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
units=(fastinfer.service fastinfer-http.socket fastinfer-management.socket fastinfer-binary.socket)
user=fastinfer

live() { [ -z "$root" ]; }

if live && [ "$(id -u)" -ne 0 ]; then
    echo "install-service.sh: run as root (or use --root DIR)" >&2
    exit 1
fi

# The user. A system user: logind's RemoveIPC= (on by default) would otherwise delete its
# shared-memory segments whenever its last login session ended.
if live && ! getent passwd "$user" >/dev/null; then
    nologin="$(command -v nologin || echo /usr/sbin/nologin)"
    useradd --system --user-group --no-create-home --home-dir /var/lib/fastinfer \
        --shell "$nologin" --comment "fastinfer inference server" "$user"
    echo "created system user $user"
fi

# The configuration, readable by the service but not by everyone.
config="$root/etc/fastinfer/config.toml"
install -d -m 0755 "$root/etc/fastinfer"
if [ ! -e "$config" ]; then
    # Every option, commented out, with its help and default (`fastinfer config --print --template`).
    cp "$here/config.toml" "$config.tmp"
    chmod 0640 "$config.tmp"
    live && chown "root:$user" "$config.tmp"
    mv "$config.tmp" "$config"  # all at once: never a half-written configuration
    echo "wrote $config"
fi

# The model store, inside the service's StateDirectory=.
install -d -m 0750 "$root/var/lib/fastinfer" "$root/var/lib/fastinfer/models"
live && chown "$user:$user" "$root/var/lib/fastinfer" "$root/var/lib/fastinfer/models"

# The units; ExecStart= names the chosen executable.
unit_dir="$root/etc/systemd/system"
install -d -m 0755 "$unit_dir"
for unit in "${units[@]}"; do
    install -m 0644 "$here/$unit" "$unit_dir/$unit"
done
if [ "$bin" != /usr/local/bin/fastinfer ]; then
    sed -i "s|^ExecStart=/usr/local/bin/fastinfer |ExecStart=$bin |" "$unit_dir/fastinfer.service"
fi
if live && [ ! -x "$bin" ]; then
    echo "warning: $bin does not exist yet: install fastinfer there, or pass --bin" >&2
fi
echo "installed ${units[*]} into $unit_dir"

if ! live; then
    [ "$enable" -eq 1 ] && echo "--root given: not enabling anything"
    exit 0
fi
if [ ! -d /run/systemd/system ]; then
    # Not booted with systemd (a container, a chroot, an image build): links only, no start.
    echo "systemd is not running here: not reloading or starting anything"
    [ "$enable" -eq 1 ] && systemctl enable "${units[@]}"
    exit 0
fi
systemctl daemon-reload
if [ "$enable" -eq 1 ]; then
    systemctl enable --now "${units[@]}"
else
    echo "start it with: systemctl enable --now ${units[*]}"
fi
