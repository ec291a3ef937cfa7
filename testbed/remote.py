"""Remote driver: ``testbed --host [USER@]HOST [options] run|matrix|doctor ...``.

Runs the same testbed command on a remote Linux machine or VM, in its project checkout
(``--remote-dir``, default ``/vagrant``, the Vagrant synced folder), streams its progress
line by line, and copies the results directory of the run back over SFTP.

Security: the server's host key must already be in the known_hosts file given with
``--known-hosts`` (``[host]:port`` form for a port other than 22; written from the VM's
recorded host key, never accepted on first use: paramiko's RejectPolicy). No SSH agent and
no key search unless asked (``--agent``, ``--look-for-keys``): only ``--identity``.
Connecting, the banner, authentication and every command are bounded by timeouts, and a
silent connection is probed with a keepalive request. Failures are one line each: unknown
host key, changed host key, refused login, lost connection, a remote machine that fails
``doctor``. Nothing the driver prints contains key material.

On the remote side, every testbed command runs under :mod:`testbed.remote_guard`, which
stops the run (and so releases everything it made) when the SSH session disappears.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import io
import json
import logging
import os
import posixpath
import shlex
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import paramiko

from testbed.errors import TestbedError

# paramiko's transport thread logs failures with tracebacks; without a handler Python would
# print them on stderr. The driver reports every failure itself, in one line.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False

REMOTE_COMMANDS = ("run", "matrix", "doctor")
DEFAULT_REMOTE_DIR = "/vagrant"
DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
GUARD_LOST_EXIT = 255

LineSink = Callable[[str], None]


class RemoteError(TestbedError):
    """The remote machine could not be used; the message says why, in one line."""

    exit_code = 4


class NotYetReachable(RemoteError):
    """Nothing answers SSH yet (connection refused or reset, no banner): worth retrying
    while a VM boots. Host-key and login failures are never of this kind."""


class HostKeyUnknown(RemoteError):
    pass


class HostKeyChanged(RemoteError):
    pass


class LoginRefused(RemoteError):
    pass


class ConnectionLost(RemoteError):
    pass


class RemoteCommandTimeout(RemoteError):
    pass


class RemoteNotReady(RemoteError):
    """The remote machine is reachable but cannot run the testbed (doctor, checkout)."""

    exit_code = 3


@dataclass(frozen=True)
class Target:
    user: str
    host: str
    port: int = 22

    @property
    def known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        return f"{self.user}@{self.host}" + ("" if self.port == 22 else f":{self.port}")


def parse_target(text: str, port: int = 22) -> Target:
    user, sep, host = text.rpartition("@")
    if not sep:
        user = getpass.getuser()
    if not host or not user or any(c.isspace() for c in text):
        raise RemoteError(f"--host {text!r}: expected [USER@]HOST")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Target(user=user, host=host, port=port)


@dataclass
class SSHOptions:
    known_hosts: Path
    identity: Path | None = None
    allow_agent: bool = False
    look_for_keys: bool = False
    connect_timeout: float = 15.0
    banner_timeout: float = 15.0
    auth_timeout: float = 15.0
    keepalive_idle_s: float = 30.0     # probe the server after this long without output
    keepalive_reply_s: float = 20.0    # ... and give up when it does not answer this fast
    extra: dict[str, str] = field(default_factory=dict)


def _fingerprint(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}" if hasattr(key, "fingerprint") else (
        f"{key.get_name()} MD5:{key.get_fingerprint().hex()}")


class RemoteSession:
    """One SSH connection with strict host-key checking; a context manager."""

    def __init__(self, target: Target, opts: SSHOptions) -> None:
        self.target = target
        self.opts = opts
        self.client: paramiko.SSHClient | None = None

    # -- connecting ---------------------------------------------------------------------
    def __enter__(self) -> RemoteSession:
        self.connect()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def connect(self) -> None:
        t, o = self.target, self.opts
        kh = o.known_hosts.expanduser()
        if not kh.is_file():
            raise HostKeyUnknown(f"known_hosts file {kh} does not exist: the host key of "
                                 f"{t.known_hosts_name} must be recorded first (host keys "
                                 "are never accepted on first use)")
        client = paramiko.SSHClient()
        try:
            client.load_system_host_keys(str(kh))
        except (OSError, paramiko.SSHException) as exc:
            raise RemoteError(f"cannot read known_hosts file {kh}: {exc}") from None
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        sock = self._socket()
        try:
            client.connect(
                t.host, port=t.port, username=t.user, sock=sock,
                key_filename=str(o.identity.expanduser()) if o.identity else None,
                allow_agent=o.allow_agent, look_for_keys=o.look_for_keys,
                timeout=o.connect_timeout, banner_timeout=o.banner_timeout,
                auth_timeout=o.auth_timeout, channel_timeout=o.connect_timeout)
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyChanged(
                f"host key of {t.known_hosts_name} has CHANGED: the server offers "
                f"{_fingerprint(exc.key)} but {kh} records {_fingerprint(exc.expected_key)}"
                " (possible man-in-the-middle; if the machine was rebuilt, remove the old "
                "line and record the new key)") from None
        except paramiko.PasswordRequiredException:
            client.close()
            raise LoginRefused(f"the key {o.identity} is encrypted: load it in an agent "
                               "and pass --agent") from None
        except paramiko.AuthenticationException:
            client.close()
            how = ", ".join(filter(None, [f"key {o.identity}" if o.identity else "",
                                          "agent" if o.allow_agent else "",
                                          "~/.ssh keys" if o.look_for_keys else ""]))
            raise LoginRefused(f"{t.host}:{t.port} refused the login as {t.user!r} "
                               f"(tried: {how or 'no credentials: pass --identity'})") from None
        except paramiko.SSHException as exc:
            client.close()
            msg = str(exc)
            if "not found in known_hosts" in msg:
                raise HostKeyUnknown(
                    f"host key of {t.known_hosts_name} is unknown: {kh} has no entry for "
                    "it (record the machine's host key there; it is never accepted on "
                    "first use)") from None
            if any(k in msg for k in ("banner", "reset", "EOF", "No existing session")):
                raise NotYetReachable(f"no SSH banner from {t.host}:{t.port} within "
                                      f"{o.banner_timeout:.0f} s ({msg})") from None
            raise RemoteError(f"SSH to {t.host}:{t.port} failed: {msg}") from None
        except (OSError, EOFError) as exc:
            client.close()
            raise NotYetReachable(f"connection to {t.host}:{t.port} failed: "
                                  f"{exc or type(exc).__name__}") from None
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(15)
        self.client = client

    def _socket(self) -> socket.socket:
        t, o = self.target, self.opts
        try:
            sock = socket.create_connection((t.host, t.port), timeout=o.connect_timeout)
        except TimeoutError:
            raise NotYetReachable(f"connection to {t.host}:{t.port} timed out after "
                                  f"{o.connect_timeout:.0f} s") from None
        except OSError as exc:
            raise NotYetReachable(f"cannot connect to {t.host}:{t.port}: "
                                  f"{exc.strerror or exc}") from None
        # The kernel notices a dead peer too: TCP keepalive and a bound on unacked data.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, val in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 4),
                         ("TCP_USER_TIMEOUT", 60_000)):
            if hasattr(socket, opt):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
        return sock

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    @property
    def transport(self) -> paramiko.Transport:
        if self.client is None or self.client.get_transport() is None:
            raise ConnectionLost(f"not connected to {self.target}")
        transport = self.client.get_transport()
        assert transport is not None
        return transport

    def _lost(self, what: str, elapsed: float) -> ConnectionLost:
        return ConnectionLost(f"lost the connection to {self.target} during {what} after "
                              f"{elapsed:.0f} s (the remote side stops the command and "
                              "releases what it made when its SSH session ends)")

    def _alive(self) -> bool:
        """Ask the server for a reply (a global request); False when none comes in time."""
        transport = self.transport
        done = threading.Event()

        def ask() -> None:
            with contextlib.suppress(Exception):
                transport.global_request("keepalive@openssh.com", wait=True)
            done.set()

        threading.Thread(target=ask, daemon=True).start()
        return done.wait(self.opts.keepalive_reply_s) and transport.is_active()

    # -- commands -----------------------------------------------------------------------
    def run(self, command: str, *, timeout: float, stdin: bytes | None = None,
            keep_stdin_open: bool = False, on_stdout: LineSink | None = None,
            on_stderr: LineSink | None = None, what: str = "") -> int:
        """Run ``command``; stream its output line by line to the sinks; return its exit
        status. ``stdin`` is sent then closed unless ``keep_stdin_open`` (the guard reads
        end of file on it as "the session is gone")."""
        what = what or f"`{command[:60]}`"
        t0 = time.monotonic()
        try:
            chan = self.transport.open_session(timeout=self.opts.connect_timeout)
            chan.settimeout(0.0)
            chan.exec_command(command)
            if stdin:
                chan.settimeout(timeout)
                chan.sendall(stdin)
                chan.settimeout(0.0)
            if not keep_stdin_open:
                chan.shutdown_write()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if not self.transport.is_active():
                raise self._lost(what, time.monotonic() - t0) from None
            raise RemoteError(f"cannot start {what} on {self.target}: {exc}") from None
        bufs = {1: b"", 2: b""}
        sinks = {1: on_stdout, 2: on_stderr}

        def feed(n: int, data: bytes, final: bool = False) -> None:
            bufs[n] += data
            *lines, bufs[n] = bufs[n].split(b"\n")
            if final and bufs[n]:
                lines.append(bufs[n])
                bufs[n] = b""
            sink = sinks[n]
            if sink is not None:
                for line in lines:
                    sink(line.decode("utf-8", "replace").rstrip("\r"))

        deadline = t0 + timeout
        last_data = time.monotonic()
        try:
            while True:
                got = False
                while chan.recv_ready():
                    feed(1, chan.recv(65536))
                    got = True
                while chan.recv_stderr_ready():
                    feed(2, chan.recv_stderr(65536))
                    got = True
                if got:
                    last_data = time.monotonic()
                elif chan.exit_status_ready() and chan.eof_received:
                    break
                elif not self.transport.is_active() or (
                        chan.closed and not chan.exit_status_ready()):
                    raise self._lost(what, time.monotonic() - t0)
                now = time.monotonic()
                if now > deadline:
                    chan.close()
                    raise RemoteCommandTimeout(
                        f"{what} on {self.target} did not finish within {timeout:.0f} s; "
                        "stopped it (closing the session stops the remote run)")
                if now - last_data > self.opts.keepalive_idle_s:
                    if not self._alive():
                        chan.close()
                        raise self._lost(what, now - t0)
                    last_data = time.monotonic()
                if not got:
                    time.sleep(0.05)
        except KeyboardInterrupt:
            chan.close()
            raise
        feed(1, b"", final=True)
        feed(2, b"", final=True)
        status = chan.recv_exit_status()
        chan.close()
        return status

    def capture(self, command: str, *, timeout: float, what: str = "",
                keep_stdin_open: bool = False) -> tuple[int, str, str]:
        out: list[str] = []
        err: list[str] = []
        rc = self.run(command, timeout=timeout, on_stdout=out.append, on_stderr=err.append,
                      what=what, keep_stdin_open=keep_stdin_open)
        return rc, "\n".join(out), "\n".join(err)

    # -- files --------------------------------------------------------------------------
    def sftp(self) -> paramiko.SFTPClient:
        sftp = self.transport.open_sftp_client()
        channel = sftp.get_channel()
        if channel is not None:
            channel.settimeout(60.0)
        return sftp

    def listdir(self, path: str) -> set[str]:
        try:
            with self.sftp() as sftp:
                return set(sftp.listdir(path))
        except FileNotFoundError:
            return set()
        except (OSError, paramiko.SSHException) as exc:
            if not self.transport.is_active():
                raise self._lost(f"listing {path}", 0) from None
            raise RemoteError(f"cannot list {self.target}:{path}: {exc}") from None

    def fetch_tree(self, remote_dir: str, local_dir: Path) -> int:
        """Copy ``remote_dir`` recursively into ``local_dir``; return the number of files.
        Symbolic links are not followed; names that would escape are refused."""
        count = 0
        try:
            with self.sftp() as sftp:
                stack = [(remote_dir, local_dir)]
                while stack:
                    rdir, ldir = stack.pop()
                    ldir.mkdir(parents=True, exist_ok=True)
                    for entry in sftp.listdir_attr(rdir):
                        name = entry.filename
                        if name in (".", "..") or "/" in name:
                            continue
                        mode = entry.st_mode or 0
                        rpath, lpath = posixpath.join(rdir, name), ldir / name
                        if stat.S_ISDIR(mode):
                            stack.append((rpath, lpath))
                        elif stat.S_ISREG(mode):
                            sftp.get(rpath, str(lpath))
                            count += 1
        except (OSError, paramiko.SSHException, EOFError) as exc:
            if not self.transport.is_active():
                raise self._lost(f"copying {remote_dir}", 0) from None
            raise RemoteError(f"cannot copy {self.target}:{remote_dir}: {exc}") from None
        return count


def sync_tree(session: RemoteSession, tar: bytes, remote_dir: str,
              keep: Sequence[str] = (".venv",), timeout: float = 600) -> None:
    """Make ``remote_dir`` hold exactly the files of ``tar`` (plus the names in ``keep``)."""
    keep_expr = " ".join(f"! -name {shlex.quote(k)}" for k in keep)
    d = shlex.quote(remote_dir)
    cmd = (f"mkdir -p {d} && find {d} -mindepth 1 -maxdepth 1 {keep_expr} "
           f"-exec rm -rf {{}} + && tar -x -m -C {d} -f -")
    err: list[str] = []
    rc = session.run(cmd, timeout=timeout, stdin=tar, on_stderr=err.append,
                     what=f"syncing the project into {remote_dir}")
    if rc != 0:
        raise RemoteError(f"syncing into {session.target}:{remote_dir} failed (exit {rc}): "
                          + " ".join(err)[-300:])


def prefixed(prefix: str, stream: io.TextIOBase | None = None) -> LineSink:
    def sink(line: str) -> None:
        print(f"[{prefix}] {line}", file=stream or sys.stderr, flush=True)
    return sink


# -- the command line ----------------------------------------------------------------------
def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]] | None:
    """(global options, the command and its arguments) when ``--host`` comes before the
    command; None when this is not a remote invocation."""
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            # The first word that is not an option or an option's value is the command.
            prev = argv[i - 1] if i else ""
            if prev in _VALUED_OPTIONS:
                continue
            head = list(argv[:i])
            if any(h == "--host" or h.startswith("--host=") for h in head):
                return head, list(argv[i:])
            return None
    head = list(argv)
    return (head, []) if any(h == "--host" or h.startswith("--host=") for h in head) else None


_VALUED_OPTIONS = ("--host", "--ssh-port", "--known-hosts", "--identity", "--remote-dir",
                   "--remote-timeout")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="testbed --host", add_help=False,
        description="run a testbed command on a remote machine over SSH")
    p.add_argument("--host", required=True, metavar="[USER@]HOST")
    p.add_argument("--ssh-port", type=int, default=22, metavar="N")
    p.add_argument("--known-hosts", default=str(DEFAULT_KNOWN_HOSTS), metavar="FILE",
                   help="known_hosts file that must already hold the host key")
    p.add_argument("--identity", default=None, metavar="FILE", help="private key file")
    p.add_argument("--agent", action="store_true", help="also offer the SSH agent's keys")
    p.add_argument("--look-for-keys", action="store_true", help="also try ~/.ssh/id_*")
    p.add_argument("--remote-dir", default=DEFAULT_REMOTE_DIR, metavar="DIR",
                   help="project checkout on the remote machine (default /vagrant)")
    p.add_argument("--remote-timeout", type=float, default=4 * 3600, metavar="S",
                   help="bound on the remote command (default 4 h)")
    return p


def _strip_out(args: list[str]) -> tuple[list[str], str | None]:
    """Remove ``--out DIR`` (the LOCAL results root) from the forwarded arguments."""
    out: str | None = None
    kept: list[str] = []
    it = iter(args)
    for a in it:
        if a == "--out":
            out = next(it, None)
        elif a.startswith("--out="):
            out = a.split("=", 1)[1]
        else:
            kept.append(a)
    return kept, out


def _guard_command(remote_dir: str, args: Sequence[str]) -> str:
    d = shlex.quote(remote_dir)
    return (f"cd {d} && exec .venv/bin/python -m testbed.remote_guard -- "
            + " ".join(shlex.quote(a) for a in args))


def _preflight(s: RemoteSession, remote_dir: str) -> None:
    d = shlex.quote(remote_dir)
    rc, _, _ = s.capture(f"test -d {d} || exit 10; test -x {d}/.venv/bin/testbed || exit 11; "
                         f"test -f {d}/testbed/remote_guard.py || exit 12",
                         timeout=30, what="the checkout check")
    if rc == 10:
        raise RemoteNotReady(f"{s.target} has no project checkout at {remote_dir} "
                             "(pass --remote-dir, or sync the project there)")
    if rc == 11:
        raise RemoteNotReady(f"{s.target}:{remote_dir} is not provisioned (no "
                             ".venv/bin/testbed): run `sudo bash scripts/setup.sh` there "
                             "(`vagrant provision` for the Vagrant VM)")
    if rc == 12:
        raise RemoteNotReady(f"{s.target}:{remote_dir} holds an older testbed without "
                             "testbed/remote_guard.py: sync the project there")
    if rc != 0:
        raise RemoteError(f"checking {s.target}:{remote_dir} failed (exit {rc})")


def _doctor(s: RemoteSession, remote_dir: str) -> tuple[int, dict[str, object]]:
    rc, out, err = s.capture(_guard_command(remote_dir, ["doctor", "--json"]), timeout=180,
                             what="`testbed doctor`", keep_stdin_open=True)
    if rc == GUARD_LOST_EXIT:
        raise s._lost("`testbed doctor`", 0)
    try:
        report = json.loads(out)
    except json.JSONDecodeError:
        tail = (err or out).strip().splitlines()[-1:] or ["no output"]
        raise RemoteNotReady(f"`testbed doctor` failed on {s.target} (exit {rc}): "
                             f"{tail[0]}") from None
    return rc, report


def _doctor_failure(target: Target, report: dict[str, object]) -> RemoteNotReady:
    checks = report.get("checks", [])
    bad = [c for c in checks if isinstance(c, dict) and c.get("essential") and not c.get("ok")]
    parts = [f"{c['name']} ({c.get('detail', '')}" + (f"; fix: {c['fix']}" if c.get("fix")
                                                      else "") + ")" for c in bad]
    return RemoteNotReady(f"{target} cannot run the testbed: doctor reports missing "
                          f"essentials: {', '.join(parts) or 'unknown'}")


def main(argv: Sequence[str]) -> int:
    """Entry point from testbed.cli when ``--host`` is given. Returns an exit status;
    raises TestbedError subclasses (the CLI prints them as one line)."""
    split = split_argv(argv)
    assert split is not None
    head, rest = split
    ns = build_parser().parse_args(head)
    if not rest or rest[0] not in REMOTE_COMMANDS:
        raise RemoteError(f"--host runs one of {', '.join(REMOTE_COMMANDS)} remotely, not "
                          f"{rest[0] if rest else 'nothing'!r}")
    command = rest[0]
    target = parse_target(ns.host, ns.ssh_port)
    opts = SSHOptions(known_hosts=Path(ns.known_hosts),
                      identity=Path(ns.identity) if ns.identity else None,
                      allow_agent=ns.agent, look_for_keys=ns.look_for_keys)
    if ns.identity and not Path(ns.identity).expanduser().is_file():
        raise LoginRefused(f"identity file {ns.identity} does not exist")
    progress = prefixed(str(target.host))
    t0 = time.monotonic()
    with RemoteSession(target, opts) as s:
        _preflight(s, ns.remote_dir)
        if command == "doctor":
            rc, report = _doctor(s, ns.remote_dir)
            if "--json" in rest:
                print(json.dumps(report, indent=2))
            else:
                from testbed.runtime import doctor

                rep = doctor.DoctorReport(checks=[doctor.Check(**c)
                                                  for c in report["checks"]])  # type: ignore
                print(f"doctor on {target} ({ns.remote_dir}):")
                print(doctor.render_table(rep))
            if not report.get("essentials_ok"):
                raise _doctor_failure(target, report)
            return rc
        # run / matrix: the remote machine must pass doctor first.
        _, report = _doctor(s, ns.remote_dir)
        if not report.get("essentials_ok"):
            raise _doctor_failure(target, report)
        args, local_out = _strip_out(rest)
        local_root = Path(local_out) if local_out else Path(
            os.environ.get("TESTBED_RESULTS", Path(__file__).resolve().parents[1] / "results"))
        results_dir = posixpath.join(ns.remote_dir, "results")
        before = s.listdir(results_dir)
        wants_json = "--json" in args
        stdout_lines: list[str] = []

        def on_stdout(line: str) -> None:
            if wants_json:
                stdout_lines.append(line)
            else:
                print(line, flush=True)

        progress(f"running `testbed {' '.join(args)}` in {ns.remote_dir}")
        rc = s.run(_guard_command(ns.remote_dir, args), timeout=ns.remote_timeout,
                   keep_stdin_open=True, on_stdout=on_stdout, on_stderr=progress,
                   what=f"`testbed {command}`")
        if rc == GUARD_LOST_EXIT:
            raise s._lost(f"`testbed {command}`", time.monotonic() - t0)
        new = sorted(e for e in s.listdir(results_dir) - before if not e.startswith("."))
        fetched: list[Path] = []
        for entry in new:
            dest = local_root / entry
            n = s.fetch_tree(posixpath.join(results_dir, entry), dest)
            progress(f"copied {n} files of {results_dir}/{entry} to {dest}")
            fetched.append(dest)
    if wants_json:
        for line in stdout_lines:
            if line.startswith("{"):
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError:
                    print(line)
                    continue
                doc["remote"] = str(target)
                doc["local_run_dir"] = str(fetched[-1]) if fetched else ""
                print(json.dumps(doc, default=str))
            else:
                print(line)
    else:
        for dest in fetched:
            print(f"results (copied from {target.host}): {dest}")
    return rc
