#!/usr/bin/env bash
# Runs the test suite inside the running Vagrant VM (see Vagrantfile) and copies its
# results/ back to this host's results/.
#
#   scripts/vagrant-test.sh              `make vagrant-test`: fails if no VM is running
#   scripts/vagrant-test.sh --if-running what `make test` calls on a host that cannot run
#                                        the testbed itself
#
# Exit status: that of `make test` in the VM; 3 when there is no running VM to use.
set -euo pipefail
cd "$(dirname "$0")/.."

if_running=0
[ "${1:-}" = --if-running ] && if_running=1

say() { printf 'vagrant-test: %s\n' "$*" >&2; }

if ! command -v vagrant >/dev/null 2>&1; then
    say "this machine cannot run the testbed and has no vagrant either: install Vagrant" \
        "(with libvirt or VirtualBox), then \`vagrant up\` and \`make test\` (README: The VM)"
    exit 3
fi
state=$(vagrant status --machine-readable 2>/dev/null |
        awk -F, '$3 == "state" { print $4; exit }' || true)
if [ "$state" != running ]; then
    if [ "$if_running" = 1 ]; then
        say "no running Vagrant VM to run the suite in (state: ${state:-none}):" \
            "run \`vagrant up\`, then \`make test\` again"
    else
        say "the Vagrant VM is not running (state: ${state:-none}): run \`vagrant up\` first"
    fi
    exit 3
fi

say "running the suite inside the Vagrant VM (vagrant rsync, then make test in /vagrant)"
vagrant rsync
rc=0
vagrant ssh -c 'cd /vagrant && sudo make test' || rc=$?
mkdir -p results
if vagrant ssh -c 'cd /vagrant && sudo tar -c -f - results' 2>/dev/null | tar -x -f - ; then
    say "results/ of the VM copied to $(pwd)/results"
else
    say "could not copy results/ back from the VM"
fi
exit "$rc"
