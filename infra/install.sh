#!/bin/sh
# Installs or updates the Secure Chat relay from the files `cargo xtask deploy` uploaded
# next to this script, then (re)starts its systemd service. Runs on the instance as the
# login user (sudo for the system paths). DESTDIR, normally unset, installs under another
# root instead (the deploy test's stand-in host uses it).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=${DESTDIR:-}
if [ "$(id -u)" -eq 0 ]; then sudo=; else sudo="sudo -n"; fi

# install(1) replaces the binary by a new file, so a running relay is not disturbed until
# the restart below.
$sudo install -D -m 0755 "$here/chat-server" "$root/usr/local/bin/chat-server"
$sudo install -D -m 0644 "$here/server.ron" "$root/etc/secure-chat/server.ron"
$sudo install -D -m 0644 "$here/chat-server.service" "$root/etc/systemd/system/chat-server.service"

$sudo systemctl daemon-reload
$sudo systemctl enable chat-server.service
$sudo systemctl restart chat-server.service
echo "chat-server $("$root/usr/local/bin/chat-server" --version | cut -d' ' -f2) installed; service $($sudo systemctl is-active chat-server.service || true)"
