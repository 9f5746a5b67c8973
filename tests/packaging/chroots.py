"""Debian chroots of bookworm and trixie, amd64 and arm64, for the package's tests.

    python -m tests.packaging.chroots build [RELEASE-ARCH ...]   (default: all four)
    python -m tests.packaging.chroots list
    python -m tests.packaging.chroots shell RELEASE-ARCH          (a throwaway instance)
    python -m tests.packaging.chroots clean [--all]

A chroot is built once with debootstrap from Debian's archive (the release, its -updates
and -security suites) and cached under $DOUBLENAT_CHROOT_CACHE (default
/var/cache/doublenat-chroots), keyed by release, architecture and a hash of the recipe
(package lists, mirror, the runtime dependencies read from packaging/debian/control).
A cached chroot older than $DOUBLENAT_CHROOT_MAX_AGE_DAYS (default 7) is built again, so
tests keep meeting the release as its users have it. arm64 runs under qemu-user-static
through binfmt_misc.

Every chroot has supervisor and natpmpc installed (the install test's programs), and the
package's runtime dependencies downloaded into apt's cache but not installed, so
`apt-get install ./doublenat_*.deb` resolves them from the release's index without the
network. amd64 chroots also carry what the test suites and the end-to-end bed run there
(python3-pytest, python3-hypothesis, openssl, miniupnpd). Package scripts never start
services in them (policy-rc.d).

Tests never touch a cached chroot: each `Instance` is an overlay on it, mounted in a private
mount namespace whose first process is PID 1 of a private PID namespace (optionally in a
network namespace of its own, with only loopback). When that process ends, the kernel kills
everything that ran inside and drops every mount, so nothing is left on the host even if
the test process is killed. Host paths into the instance go through /proc/PID/root.

Needs root, debootstrap, unshare and nsenter (util-linux); qemu-user-static and
binfmt-support for arm64. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
CONTROL = ROOT / "packaging" / "debian" / "control"

RELEASES = ("bookworm", "trixie")
ARCHES = ("amd64", "arm64")
MIRROR = os.environ.get("DOUBLENAT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get("DOUBLENAT_DEBIAN_SECURITY_MIRROR",
                                 "http://deb.debian.org/debian-security")
CACHE = Path(os.environ.get("DOUBLENAT_CHROOT_CACHE", "/var/cache/doublenat-chroots"))
MAX_AGE_DAYS = float(os.environ.get("DOUBLENAT_CHROOT_MAX_AGE_DAYS", "7"))
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Bump when the build steps change in a way the package lists do not show.
RECIPE = 2
# Installed in every chroot: what the install test runs besides the package.
BASE_PACKAGES = ("supervisor", "natpmpc")
# Installed in amd64 chroots too: the unit and integration suites under the release's
# python3 (tests/packaging/test_releases.py) and the end-to-end bed's upstream
# (tests/e2e). openssl makes the TLS tests' certificates, procps gives ps and pgrep,
# prometheus scrapes the daemon's /metrics and its promtool checks the README's rules.
SUITE_PACKAGES = ("python3-pytest", "python3-hypothesis", "openssl", "procps",
                  "miniupnpd", "miniupnpd-nftables", "prometheus")
QEMU = {"arm64": "qemu-aarch64"}
# The CPU qemu emulates for arm64: a Raspberry Pi 4's (ARMv8.0, like the Pi 3's Cortex-A53
# and unlike qemu's default "max"). Besides being what the users run, it has no pointer
# authentication: trixie's binaries are built with -mbranch-protection=standard, and qemu
# 7.2 emulating PAuth makes trixie's python3 about 9 times slower (measured: 3.1 s against
# 0.33 s for the same loop); on a CPU without it those instructions are no-ops.
QEMU_CPU = os.environ.get("DOUBLENAT_QEMU_CPU", "cortex-a72")
METADATA = "doublenat-chroot.json"
# Versions recorded in the metadata (and printed by `list`), installed or cached.
REPORTED = ("python3", "supervisor", "natpmpc", "miniupnpd", "prometheus", "python3-gevent",
            "python3-click", "python3-pythonjsonlogger", "python3-prometheus-client",
            "python3-pytest", "python3-hypothesis")


class ChrootError(RuntimeError):
    pass


def runtime_dependencies(control: Path = CONTROL) -> tuple[str, ...]:
    """The binary package's Depends, names only (substitution variables left out)."""
    text = control.read_text()
    binary = text.split("\nPackage: doublenat\n", 1)[1]
    match = re.search(r"^Depends:(.*?)(?=^\S)", binary + "\nEnd:", re.M | re.S)
    if not match:
        raise ChrootError(f"{control}: no Depends in the doublenat package")
    names = []
    for item in match.group(1).replace("\n", " ").split(","):
        item = item.strip()
        if item and not item.startswith("${"):
            names.append(item.split()[0])
    return tuple(sorted(names))


def host_arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def host_release() -> str:
    """VERSION_CODENAME of the host's /etc/os-release ('' when unknown)."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return ""
    match = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", text, re.M)
    return match.group(1) if match else ""


@dataclass(frozen=True)
class Spec:
    """What a chroot is: release, architecture, and the packages of the recipe."""

    release: str
    arch: str

    def __post_init__(self) -> None:
        if self.release not in RELEASES or self.arch not in ARCHES:
            raise ValueError(f"no recipe for {self.release}-{self.arch}; "
                             f"known: {RELEASES} x {ARCHES}")

    @classmethod
    def parse(cls, name: str) -> Spec:
        release, _, arch = name.partition("-")
        return cls(release, arch or host_arch())

    @property
    def name(self) -> str:
        return f"{self.release}-{self.arch}"

    @property
    def installed(self) -> tuple[str, ...]:
        return BASE_PACKAGES + (SUITE_PACKAGES if self.arch == "amd64" else ())

    @property
    def downloaded(self) -> tuple[str, ...]:
        return runtime_dependencies()

    @property
    def key(self) -> str:
        recipe = json.dumps({"recipe": RECIPE, "release": self.release, "arch": self.arch,
                             "mirror": MIRROR, "security": SECURITY_MIRROR,
                             "installed": self.installed, "downloaded": self.downloaded},
                            sort_keys=True)
        return f"{self.name}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"

    @property
    def path(self) -> Path:
        return CACHE / self.key

    @property
    def lock_path(self) -> Path:
        return CACHE / f"{self.key}.lock"


def metadata(spec: Spec) -> dict[str, Any] | None:
    """The metadata of the cached chroot, or None when there is no complete one."""
    try:
        return dict(json.loads((spec.path / METADATA).read_text()))
    except (OSError, ValueError):
        return None


def fresh(spec: Spec) -> bool:
    meta = metadata(spec)
    if meta is None:
        return False
    return time.time() - float(meta["built_at"]) < MAX_AGE_DAYS * 86400


@contextlib.contextmanager
def _locked(spec: Spec, shared: bool) -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(spec.lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_binfmt(arch: str) -> None:
    """arm64 binaries run through qemu-user-static: its binfmt_misc entry must be enabled
    (with the F flag, so the interpreter is found inside a chroot)."""
    if arch == host_arch():
        return
    name = QEMU[arch]
    entry = Path("/proc/sys/fs/binfmt_misc") / name
    if not Path("/proc/sys/fs/binfmt_misc/register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"],
                       capture_output=True, check=False)
    if (not entry.exists() or "enabled" not in entry.read_text()) and \
            shutil.which("update-binfmts"):
        subprocess.run(["update-binfmts", "--enable", name], capture_output=True, check=False)
    if not entry.exists() or "enabled" not in entry.read_text():
        raise ChrootError(f"{arch} binaries cannot run here: binfmt_misc has no enabled "
                          f"{name} entry (apt-get install qemu-user-static binfmt-support)")
    if "F" not in entry.read_text().split("flags:", 1)[-1].splitlines()[0]:
        raise ChrootError(f"the {name} binfmt entry lacks the F flag: it cannot run "
                          "inside a chroot (use Debian's qemu-user-static)")


def arch_env(arch: str) -> dict[str, str]:
    """Environment for programs of `arch`: qemu-user reads QEMU_CPU from it."""
    return {} if arch == host_arch() else {"QEMU_CPU": QEMU_CPU}


def missing_tools(arch: str) -> list[str]:
    tools = ["debootstrap", "unshare", "nsenter", "chroot"]
    if arch != host_arch():
        tools += ["update-binfmts"]
    return [tool for tool in tools if shutil.which(tool) is None]


_BUILD_SCRIPT = r"""
set -eu
root=$1 release=$2 arch=$3 mirror=$4 security=$5 installed=$6 downloaded=$7
export DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin
stamp() { echo "== $(date +%s) $*"; }

stamp debootstrap
debootstrap --variant=minbase --arch="$arch" "$release" "$root" "$mirror"

stamp configure
# Package scripts must not start services: the tests start supervisord themselves.
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
cat > "$root/etc/apt/sources.list" <<EOF
deb $mirror $release main
deb $mirror $release-updates main
deb $security $release-security main
EOF
cat > "$root/etc/apt/apt.conf.d/90doublenat" <<EOF
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Dpkg::Options { "--force-unsafe-io"; };
EOF
cp /etc/resolv.conf "$root/etc/resolv.conf"
# What the installer writes: tests resolve localhost.
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
echo doublenat-test > "$root/etc/hostname"
# This mount namespace is private: the mounts go with it, whatever happens.
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"

stamp apt-get update
chroot "$root" apt-get -q update
stamp apt-get upgrade
chroot "$root" apt-get -q -y dist-upgrade
stamp install $installed
chroot "$root" apt-get -q -y install $installed
# apt's cache keeps only what the package will pull in.
chroot "$root" apt-get clean
stamp download $downloaded
chroot "$root" apt-get -q -y install --download-only $downloaded
stamp done
"""


def build(spec: Spec, log: IO[str] | None = None) -> Path:
    """Build the chroot of `spec` into the cache (replacing an older one); its path."""
    if os.geteuid() != 0:
        raise ChrootError("building a chroot needs root")
    missing = missing_tools(spec.arch)
    if missing:
        raise ChrootError(f"missing {', '.join(missing)} (run `make deps`)")
    ensure_binfmt(spec.arch)
    CACHE.mkdir(parents=True, exist_ok=True)
    # Left by a build that was killed: whoever builds holds the lock, so it is dead.
    for stale in CACHE.glob(f".build-{spec.key}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".build-{spec.key}-", dir=CACHE))
    out = log or sys.stdout
    started = time.time()
    try:
        root = staging / "root"
        # --kill-child: if this process dies, the build dies with its namespace. nice: it
        # often runs beside tests that wait on timers, which it must not starve.
        done = subprocess.run(
            ["nice", "-n", "10", "unshare", "--mount", "--propagation", "private", "--fork",
             "--kill-child",
             "--", "sh", "-c", _BUILD_SCRIPT, "build", str(root), spec.release, spec.arch,
             MIRROR, SECURITY_MIRROR, " ".join(spec.installed), " ".join(spec.downloaded)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False,
            env={**os.environ, **arch_env(spec.arch)})
        if done.returncode != 0:
            raise ChrootError(f"building the {spec.name} chroot failed (status "
                              f"{done.returncode}); see the build log")
        meta = {"spec": spec.name, "key": spec.key, "built_at": time.time(),
                "build_seconds": round(time.time() - started, 1), "mirror": MIRROR,
                "installed": list(spec.installed), "downloaded": list(spec.downloaded),
                "versions": _versions(root)}
        (root / METADATA).write_text(json.dumps(meta, indent=1) + "\n")
        old = spec.path.with_name(f".old-{spec.key}-{os.getpid()}")
        if spec.path.exists():
            spec.path.rename(old)
        root.rename(spec.path)
        shutil.rmtree(old, ignore_errors=True)
        print(f"chroot {spec.name} built in {meta['build_seconds']} s: {spec.path}",
              file=out, flush=True)
        _remove_stale(spec)
        return spec.path
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_stale(spec: Spec) -> None:
    """Other recipes' chroots of the same release and architecture, past the age limit and
    in nobody's use (their lock is free), so the cache does not grow with each change."""
    for entry in CACHE.glob(f"{spec.name}-*.lock"):
        key = entry.name.removesuffix(".lock")
        path = CACHE / key
        if key == spec.key or not path.is_dir():
            continue
        try:
            built = json.loads((path / METADATA).read_text())["built_at"]
        except (OSError, ValueError, KeyError):
            continue
        if time.time() - float(built) < MAX_AGE_DAYS * 86400:
            continue
        with open(entry, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            shutil.rmtree(path, ignore_errors=True)
        entry.unlink(missing_ok=True)


def _versions(root: Path) -> dict[str, str]:
    """Versions of REPORTED packages: installed ones from dpkg's database, the others from
    the archives waiting in apt's cache."""
    versions: dict[str, str] = {}
    status = (root / "var/lib/dpkg/status").read_text()
    for block in status.split("\n\n"):
        fields = dict(re.findall(r"^(Package|Version|Status): (.*)$", block, re.M))
        if fields.get("Package") in REPORTED and "installed" in fields.get("Status", ""):
            versions[fields["Package"]] = fields["Version"]
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        name, version, _arch = deb.name[:-4].split("_")
        if name in REPORTED and name not in versions:
            versions[name] = version.replace("%3a", ":") + " (in apt's cache)"
    return dict(sorted(versions.items()))


def ensure(spec: Spec, log: IO[str] | None = None) -> Path:
    """The cached chroot of `spec`, built first if missing or stale. Safe to call from
    several processes at once: one builds, the others wait for it."""
    if fresh(spec):
        return spec.path
    with _locked(spec, shared=False):
        if not fresh(spec):
            build(spec, log)
    return spec.path


# ------------------------------------------------------------------------------ instances


_HOLDER_SCRIPT = r"""
set -eu
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
lower=$1 upper=$2 work=$3 root=$4 net=$5
shift 5
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys" 2>/dev/null || mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
mkdir -p "$root/run/lock"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
for bind in "$@"; do
    mkdir -p "$root$bind"
    mount --bind "$bind" "$root$bind"
done
if [ "$net" = yes ]; then ip link set lo up; fi
echo ready
# Until the test closes stdin (or dies): then this PID 1 exits and the kernel ends
# everything in the namespaces.
read -r _ || true
"""


@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> Result:
        if self.returncode != 0:
            raise ChrootError(f"{shlex.join(self.argv)} exited {self.returncode}\n"
                              f"--- stdout\n{self.stdout[-4000:]}\n"
                              f"--- stderr\n{self.stderr[-4000:]}")
        return self


@dataclass
class Instance:
    """A throwaway overlay on a cached chroot, in its own mount and PID namespaces (and
    network namespace when `own_network`). Use as a context manager."""

    spec: Spec
    workdir: Path
    own_network: bool = False
    binds: Sequence[Path] = ()
    holder: subprocess.Popen[str] | None = field(default=None, init=False)
    pid: int = field(default=0, init=False)
    _lock: IO[str] | None = field(default=None, init=False)

    MOUNTPOINT = "root"

    def __enter__(self) -> Instance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        # A shared lock on the cache entry, held until close: nobody rebuilds it under a
        # mounted overlay.
        while True:
            ensure(self.spec)
            self._lock = open(self.spec.lock_path, "a+")  # noqa: SIM115
            fcntl.flock(self._lock, fcntl.LOCK_SH)
            if metadata(self.spec) is not None:
                break
            self._lock.close()  # removed while we waited for the lock: build it again
        lower = self.spec.path
        for name in ("upper", "work", self.MOUNTPOINT):
            (self.workdir / name).mkdir(parents=True, exist_ok=True)
        namespaces = ["--pid", "--fork", "--mount", "--propagation", "private",
                      "--kill-child"] + (["--net"] if self.own_network else [])
        self.holder = subprocess.Popen(
            ["unshare", *namespaces, "--", "sh", "-c", _HOLDER_SCRIPT, "holder", str(lower),
             str(self.workdir / "upper"), str(self.workdir / "work"), str(self.root_mount),
             "yes" if self.own_network else "no", *(str(b) for b in self.binds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()
        if line.strip() != "ready":
            self.holder.kill()
            err = self.holder.stderr.read() if self.holder.stderr else ""
            self.close()
            raise ChrootError(f"the {self.spec.name} instance did not start: {line}{err}")
        self.pid = self._holder_pid()

    @property
    def root_mount(self) -> Path:
        return self.workdir / self.MOUNTPOINT

    def _holder_pid(self) -> int:
        """The host PID of the shell that is PID 1 inside (unshare's only child)."""
        assert self.holder is not None
        unshare = self.holder.pid
        for _ in range(100):
            children = Path(f"/proc/{unshare}/task/{unshare}/children").read_text().split()
            if children:
                return int(children[0])
            time.sleep(0.01)
        raise ChrootError("cannot find the instance's PID 1")

    def path(self, inside: str | Path) -> Path:
        """A host path to `inside` (absolute, in the instance), through /proc/PID/root."""
        return Path(f"/proc/{self.pid}/root") / str(self.root_mount).lstrip("/") / \
            str(inside).lstrip("/")

    def command(self, argv: Sequence[str], env: dict[str, str] | None = None,
                network: str | None = None) -> list[str]:
        """The host command line that runs `argv` in the instance, as root, with a clean
        environment (PATH, LANG, HOME and `env`). `network`: a network namespace file
        (e.g. /run/netns/NAME) to run in instead of the instance's."""
        if network:
            net = [f"--net={network}"]
        elif self.own_network:
            net = ["--net"]
        else:
            net = []
        environment = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": "/root",
                       **arch_env(self.spec.arch), **(env or {})}
        return ["nsenter", "-t", str(self.pid), "--mount", "--pid", *net, "--",
                "chroot", str(self.root_mount), "/usr/bin/env", "-i",
                *(f"{k}={v}" for k, v in environment.items()), *argv]

    def host_command(self, argv: Sequence[str]) -> list[str]:
        """A host program (e.g. the lab emulators from this checkout) in the instance's
        network namespace only: it sees the host's files."""
        if not self.own_network:
            return list(argv)
        return ["nsenter", "-t", str(self.pid), "--net", "--", *argv]

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
            timeout: float = 600, check: bool = True, stdin: str | None = None,
            network: str | None = None) -> Result:
        cmd = self.command(argv, env, network)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  input=stdin, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ChrootError(f"timed out after {timeout} s in {self.spec.name}: "
                              f"{shlex.join(argv)}") from exc
        result = Result(list(argv), done.returncode, done.stdout, done.stderr)
        return result.check() if check else result

    def popen(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
              network: str | None = None, **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.command(argv, env, network), **kwargs)

    def copy_in(self, source: Path, inside: str) -> str:
        """Copy a host file or directory into the instance; its path inside."""
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True)
        else:
            shutil.copy2(source, target)
        return inside

    def close(self) -> None:
        """End PID 1 (the kernel kills what is left inside and drops the mounts), then
        delete the overlay's upper layer."""
        if self.holder is not None:
            with contextlib.suppress(OSError, ValueError):
                if self.holder.stdin:
                    self.holder.stdin.close()
            try:
                self.holder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                if self.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, 9)
                self.holder.kill()
                self.holder.wait(timeout=30)
            for stream in (self.holder.stdout, self.holder.stderr):
                if stream:
                    stream.close()
            self.holder = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        for name in ("upper", "work", self.MOUNTPOINT):
            target = self.workdir / name
            if target.is_mount():
                raise ChrootError(f"{target} is still mounted on the host")
            shutil.rmtree(target, ignore_errors=True)


# ------------------------------------------------------------------------------ command line


def _specs(names: Sequence[str]) -> list[Spec]:
    if not names:
        return [Spec(r, a) for r in RELEASES for a in ARCHES]
    return [Spec.parse(n) for n in names]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.packaging.chroots",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build the chroots that are missing or stale")
    p.add_argument("names", nargs="*", metavar="RELEASE-ARCH")
    p.add_argument("--force", action="store_true", help="build even if fresh")
    sub.add_parser("list", help="cached chroots and their versions")
    p = sub.add_parser("shell", help="a shell in a throwaway instance")
    p.add_argument("name", metavar="RELEASE-ARCH")
    p = sub.add_parser("clean", help="remove stale chroots (all with --all)")
    p.add_argument("--all", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "build":
        for spec in _specs(args.names):
            if args.force or not fresh(spec):
                with _locked(spec, shared=False):
                    if args.force or not fresh(spec):
                        build(spec)
            else:
                print(f"chroot {spec.name} is fresh: {spec.path}")
        return 0
    if args.command == "list":
        for spec in _specs([]):
            meta = metadata(spec)
            if meta is None:
                print(f"{spec.name}: not built ({spec.path})")
                continue
            age = (time.time() - meta["built_at"]) / 86400
            print(f"{spec.name}: {spec.path}, built in {meta['build_seconds']} s, "
                  f"{age:.1f} days ago{'' if fresh(spec) else ' (stale)'}")
            for name, version in meta["versions"].items():
                print(f"    {name} {version}")
        return 0
    if args.command == "shell":
        spec = Spec.parse(args.name)
        with tempfile.TemporaryDirectory(prefix="doublenat-shell-") as tmp, \
                Instance(spec, Path(tmp)) as instance:
            return subprocess.run(instance.command(["/bin/bash", "-l"])).returncode
    if args.command == "clean":
        current = {spec.key for spec in _specs([]) if fresh(spec) and not args.all}
        for entry in CACHE.glob("*") if CACHE.exists() else []:
            key = entry.name.removesuffix(".lock")
            if key not in current and not entry.name.startswith("."):
                print(f"removing {entry}")
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
