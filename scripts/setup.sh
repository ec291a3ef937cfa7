#!/usr/bin/env bash
# The one installation path for a host, the VM and CI: checks that this machine can run
# the testbed, installs the missing Debian packages, and creates or updates the Python
# environment in $VENV (default .venv). Idempotent; fast when everything is already done.
#
# Exit status: 0 ready; 3 this machine cannot run the testbed (the message says what is
# missing and how to fix it); anything else: an install step failed.
set -euo pipefail

cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.setup-stamp"
PACKAGES=(mininet tcpdump tshark nginx-light openssl curl mptcpize iptables nftables
          iproute2 util-linux socat ethtool net-tools procps openssh-server
          chromium)  # chromium: the matrix test opens report.html in a headless browser
# Tools for the VM path, only on a machine that is not itself the testbed VM (the VM image
# and the Vagrant provisioning write /etc/mptcp-testbed-vm): qemu and debootstrap for
# `make vm-test`, vagrant and vagrant-libvirt for `vagrant validate` in the
# test suite (about 19 MB download).
VM_HOST_PACKAGES=(qemu-system-x86 qemu-utils debootstrap debian-archive-keyring vagrant
                  vagrant-libvirt)
VM_MARKER=/etc/mptcp-testbed-vm
# Commands those packages provide; used to check a machine that has no dpkg.
COMMANDS=(mnexec nsenter tcpdump tshark nginx openssl curl mptcpize iptables nft ip tc socat
          ethtool netstat ps sshd)

say() { printf 'setup: %s\n' "$*"; }
not_ready() { printf 'setup: cannot run the testbed here: %s\n' "$*" >&2; exit 3; }

# -- 1. can this machine run the testbed at all? ---------------------------------------
os=$(uname -s)
[ "$os" = Linux ] || not_ready "not Linux ($os): use \`vagrant up\` then \`make test\` inside the VM"
[ "$(id -u)" -eq 0 ] || not_ready "not root: run as root (sudo make test)"
[ -e /proc/sys/net/mptcp/enabled ] || not_ready "kernel $(uname -r) has no MPTCP" \
    "(/proc/sys/net/mptcp/enabled missing): use a kernel >= 5.15 or \`vagrant up\`"
mptcp_enabled=$(cat /proc/sys/net/mptcp/enabled)
[ "$mptcp_enabled" = 1 ] || not_ready "net.mptcp.enabled=$mptcp_enabled:" \
    "run sysctl -w net.mptcp.enabled=1"
command -v "$PY" >/dev/null 2>&1 || not_ready "no Python interpreter '$PY':" \
    "install python3 >= 3.11 or set PYTHON=/path/to/python3.11"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || not_ready \
    "$PY is Python $("$PY" -c 'import platform; print(platform.python_version())' 2>&1)," \
    "the testbed needs >= 3.11: install it or set PYTHON=/path/to/python3.11"

# -- 2. Debian packages, only the missing ones -------------------------------------------
venv_works() { [ -x "$VENV/bin/python" ] &&
    "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

# Whether the package lists offer a version of $1. (Not `apt-cache | grep -q`: with
# pipefail, grep's early exit makes apt-cache die of SIGPIPE and the test fail at random.)
has_candidate() {
    local out
    out=$(apt-cache policy "$1" 2>/dev/null) || return 1
    [[ "$out" == *"Candidate: "[0-9]* ]]
}

if command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    wanted=("${PACKAGES[@]}")
    apt_opts=(-y -q -o DPkg::Lock::Timeout=120)
    apt_updated=0
    if [ ! -e "$VM_MARKER" ]; then
        # The optional packages are looked up in the package lists: on a fresh machine
        # they are empty until the first update.
        if ! has_candidate mininet; then
            say "updating the package lists"
            apt-get "${apt_opts[@]}" update >/dev/null
            apt_updated=1
        fi
        for pkg in "${VM_HOST_PACKAGES[@]}"; do
            # Optional: only where this machine's package sources have them (Ubuntu 24.04
            # has no vagrant package: there it comes from HashiCorp, see the CI workflow).
            if has_candidate "$pkg"; then
                wanted+=("$pkg")
            fi
        done
    fi
    # python3-venv only when a venv must be made and this Python cannot make one.
    if ! venv_works && ! "$PY" -m ensurepip --version >/dev/null 2>&1; then
        case "$(command -v "$PY")" in
            /usr/bin/*) wanted+=(python3-venv) ;;
            *) not_ready "$PY cannot create a virtual environment (no ensurepip):" \
                   "install its venv support or set PYTHON to a Python that has it" ;;
        esac
    fi
    missing=()
    for pkg in "${wanted[@]}"; do
        status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
        [ "$status" = "install ok installed" ] || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        echo 'wireshark-common wireshark-common/install-setuid boolean false' \
            | debconf-set-selections
        # No daemon may start during the install (nginx would, without systemd): deny all
        # service starts with policy-rc.d, and remove it afterwards only if we made it.
        policy=/usr/sbin/policy-rc.d
        made_policy=0
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\n# written by mptcp-testbed scripts/setup.sh\nexit 101\n' >"$policy"
            chmod 755 "$policy"
            made_policy=1
            trap 'rm -f "$policy"' EXIT
        fi
        nginx_pid_before=$(cat /run/nginx.pid 2>/dev/null || true)
        [ "$apt_updated" = 1 ] || apt-get "${apt_opts[@]}" update >/dev/null
        apt-get "${apt_opts[@]}" install --no-install-recommends "${missing[@]}" >/dev/null
        if [ "$made_policy" = 1 ]; then
            rm -f "$policy"
            trap - EXIT
        fi
        # Belt and braces: if the install still started an nginx, stop exactly that one.
        nginx_pid=$(cat /run/nginx.pid 2>/dev/null || true)
        if [ -n "$nginx_pid" ] && [ "$nginx_pid" != "$nginx_pid_before" ] &&
           [ "$(cat "/proc/$nginx_pid/comm" 2>/dev/null || true)" = nginx ]; then
            say "stopping the nginx (pid $nginx_pid) that the package install started"
            kill "$nginx_pid" 2>/dev/null || true
        fi
        say "Debian packages installed"
    fi
else
    absent=()
    for cmd in "${COMMANDS[@]}"; do
        command -v "$cmd" >/dev/null 2>&1 || absent+=("$cmd")
    done
    [ "${#absent[@]}" -eq 0 ] || not_ready "not a Debian/Ubuntu system (no apt-get) and" \
        "these tools are missing: ${absent[*]}; install them (packages: ${PACKAGES[*]})" \
        "or use \`vagrant up\`"
fi

# -- 3. the Python environment ----------------------------------------------------------
if ! venv_works; then
    say "creating the Python environment ($VENV) with $PY"
    "$PY" -m venv --clear "$VENV"
fi
want_stamp=$(sha256sum setup.cfg | cut -d' ' -f1)
have_stamp=$(cat "$STAMP" 2>/dev/null || true)
if [ "$want_stamp" != "$have_stamp" ] || [ ! -x "$VENV/bin/testbed" ]; then
    say "installing the testbed and its test dependencies into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
    printf '%s\n' "$want_stamp" >"$STAMP"
fi
say "python environment ready ($VENV)"
