#!/usr/bin/env bash
# Install sorterd as a service on a sorter: the user, its groups, the directories the unit
# expects, the udev rules and the unit.  Idempotent: run it again after an upgrade.
#
#   sudo systemd/install.sh [--dry-run] [--root DIR] [--no-start]
#
#   --dry-run   print each command instead of running it (nothing changes)
#   --root DIR  install into DIR as if it were / (packaging, tests): no useradd, no
#               systemctl/udevadm, files and directories only
#   --no-start  do not enable and start the unit
#
# The code itself goes to /opt/sorterd/.venv first (README "Installing on a sorter").
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
dry=0 root="" start=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --root) root="${2:?--root needs a directory}"; shift ;;
    --no-start) start=0 ;;
    *) echo "install.sh: unknown option $1 (allowed: --dry-run, --root DIR, --no-start)" >&2; exit 2 ;;
  esac
  shift
done

run() {  # print, then run unless --dry-run
  echo "+ $*"
  if [ "$dry" = 0 ]; then "$@"; fi
}
host() {  # a step that changes the running host: skipped with --root
  if [ -n "$root" ]; then echo "# skipped with --root: $*"; else run "$@"; fi
}

owner=(-o sorterd -g sorterd) etc_owner=(-o root -g sorterd)
if [ -n "$root" ]; then owner=() etc_owner=(); fi  # a staging root has no sorterd user

# 1. The user, in the groups of the devices it opens (serial, GPIO, camera).
if ! getent group gpio >/dev/null; then host groupadd -f -r gpio; fi
if ! getent passwd sorterd >/dev/null; then
  host useradd --system --home-dir /var/lib/sorterd --shell /usr/sbin/nologin --user-group \
       --groups dialout,gpio,video sorterd
else
  host usermod -a -G dialout,gpio,video sorterd
fi

# 2. Directories: state and logs owned by sorterd, 0750 (the unit's StateDirectory= and
#    LogsDirectory= modes; systemd also creates them, this makes them exist before the first
#    start, e.g. for `sorterd calibrate` as the service user); the config readable by sorterd only.
run install -d -m 0750 "${owner[@]}" "$root/var/lib/sorterd"
run install -d -m 0750 "${owner[@]}" "$root/var/log/sorterd"
run install -d -m 0750 "${etc_owner[@]}" "$root/etc/sorterd"
if [ ! -e "$root/etc/sorterd/sorterd.toml" ]; then
  run install -m 0640 "${etc_owner[@]}" "$repo/sorterd/configs/machine.toml" "$root/etc/sorterd/sorterd.toml"
fi

# 3. udev rules: the controller under a stable name, the GPIO chips for group gpio.
run install -d -m 0755 "$root/etc/udev/rules.d"
run install -m 0644 "$here/99-sorterd.rules" "$root/etc/udev/rules.d/99-sorterd.rules"
host udevadm control --reload-rules
host udevadm trigger

# 4. The unit.
run install -d -m 0755 "$root/etc/systemd/system"
run install -m 0644 "$here/sorterd.service" "$root/etc/systemd/system/sorterd.service"
host systemctl daemon-reload
if [ "$start" = 1 ]; then host systemctl enable --now sorterd; fi
echo "sorterd installed${root:+ under $root}$( [ "$dry" = 1 ] && echo ' (dry run: nothing changed)')"
