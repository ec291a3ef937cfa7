#!/usr/bin/env bash
# Writes .vagrant/known_hosts for `testbed --host` against the Vagrant VM, and prints the
# command line to use. The address and port come from `vagrant ssh-config`; the host key is
# read through `vagrant ssh` (Vagrant's own channel to the VM) and should match the
# `testbed-host-key:` line that provisioning printed during `vagrant up`. The remote driver
# never accepts a host key it does not find in this file.
#
#   scripts/vagrant-known-hosts.sh
#   .venv/bin/testbed --host vagrant@127.0.0.1 --ssh-port 2222 \
#       --known-hosts .vagrant/known_hosts --identity .vagrant/machines/default/libvirt/private_key \
#       doctor
set -euo pipefail
cd "$(dirname "$0")/.."

cfg=$(vagrant ssh-config)
field() { printf '%s\n' "$cfg" | awk -v k="$1" '$1 == k { print $2; exit }'; }
host=$(field HostName)
port=$(field Port)
user=$(field User)
identity=$(field IdentityFile | tr -d '"')
key=$(vagrant ssh -c 'cut -d" " -f1,2 /etc/ssh/ssh_host_ed25519_key.pub' 2>/dev/null | tr -d '\r')
case "$key" in
    ssh-ed25519\ *) ;;
    *) echo "vagrant-known-hosts: could not read the VM's host key (got: ${key:-nothing})" >&2
       exit 1 ;;
esac
name=$host
[ "$port" = 22 ] || name="[$host]:$port"
mkdir -p .vagrant
printf '%s %s\n' "$name" "$key" > .vagrant/known_hosts
echo "wrote .vagrant/known_hosts ($name). Use:"
echo "  .venv/bin/testbed --host $user@$host --ssh-port $port --known-hosts .vagrant/known_hosts --identity $identity doctor"
