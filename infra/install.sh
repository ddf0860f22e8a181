#!/bin/sh
# Installs or updates the Secure Chat relay from the files `cargo xtask deploy` uploaded
# next to this script, then (re)starts its systemd service. Runs on the instance as the
# login user (sudo for the system paths). DESTDIR, normally unset, installs under another
# root instead (the deploy test's stand-in host uses it).
#
#   install.sh           one host: install the relay and restart it
#   install.sh nats      a cluster node: install the relay, the NATS node and the shared
#                        TLS identity; (re)start the NATS node (restarted only if its
#                        binary or config changed); the relay is left as it is
#   install.sh relay     a cluster node: restart the relay (after `install.sh nats`)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=${DESTDIR:-}
mode=${1:-single}
if [ "$(id -u)" -eq 0 ]; then sudo=; else sudo="sudo -n"; fi

case "$mode" in
single | nats | relay) ;;
*)
  echo "install.sh: unknown mode $mode (single, nats or relay)" >&2
  exit 2
  ;;
esac

if [ "$mode" = relay ]; then
  $sudo systemctl restart chat-server.service
  echo "chat-server restarted; service $($sudo systemctl is-active chat-server.service || true)"
  exit 0
fi

# install(1) replaces the binary by a new file, so a running relay is not disturbed until
# the restart below.
$sudo install -D -m 0755 "$here/chat-server" "$root/usr/local/bin/chat-server"
$sudo install -D -m 0644 "$here/server.ron" "$root/etc/secure-chat/server.ron"
$sudo install -D -m 0644 "$here/chat-server.service" "$root/etc/systemd/system/chat-server.service"

if [ "$mode" = single ]; then
  $sudo systemctl daemon-reload
  $sudo systemctl enable chat-server.service
  $sudo systemctl restart chat-server.service
  echo "chat-server $("$root/usr/local/bin/chat-server" --version | cut -d' ' -f2) installed; service $($sudo systemctl is-active chat-server.service || true)"
  exit 0
fi

# A cluster node. NATS is restarted only when its binary or config changed: a restart
# takes this node out of the JetStream quorum for a moment.
changed=
for pair in "nats-server:usr/local/bin/nats-server" "nats-server.conf:etc/secure-chat/nats-server.conf"; do
  if ! $sudo cmp -s "$here/${pair%%:*}" "$root/${pair#*:}"; then changed=1; fi
done
$sudo install -D -m 0755 "$here/nats-server" "$root/usr/local/bin/nats-server"
$sudo install -D -m 0644 "$here/nats-server.conf" "$root/etc/secure-chat/nats-server.conf"
$sudo install -D -m 0644 "$here/nats-server.service" "$root/etc/systemd/system/nats-server.service"
$sudo install -D -m 0644 "$here/chat-server-cluster.conf" "$root/etc/systemd/system/chat-server.service.d/cluster.conf"
# The cluster's shared relay identity, handed to the relay as systemd credentials.
$sudo install -D -m 0600 "$here/relay-key.pem" "$root/etc/secure-chat/relay-key.pem"
$sudo install -D -m 0644 "$here/relay-cert.pem" "$root/etc/secure-chat/relay-cert.pem"
rm -f "$here/relay-key.pem"

$sudo systemctl daemon-reload
$sudo systemctl enable nats-server.service chat-server.service
if [ -n "$changed" ]; then
  $sudo systemctl restart nats-server.service
else
  $sudo systemctl start nats-server.service
fi
echo "nats-server $("$root/usr/local/bin/nats-server" --version | cut -d' ' -f2) installed ($(if [ -n "$changed" ]; then echo restarted; else echo unchanged; fi)); service $($sudo systemctl is-active nats-server.service || true)"
