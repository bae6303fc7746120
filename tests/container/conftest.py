"""A Docker engine and a stand-in base image for the container tests (docs/environment.md).

Development and CI machines have no Docker engine running and cannot reach an image
registry. Only where the machine may be changed (:func:`may_change_machine`: ``CI`` is set,
as CI sets ``CI=true``, or ``FMC_CONTAINER_ENGINE=install``) and as root, this installs
Debian's ``docker.io`` when it is missing, starts a private ``dockerd`` (stopped again at the
end of the session), and makes a local stand-in for the ``pytorch/pytorch`` base with
``make_base_image.sh`` (cached by tag, so later sessions skip it). The real Dockerfiles are
then built on top of it. Elsewhere a running engine with a cached stand-in is used as it is,
and any test that would need more skips with :data:`ENABLE_HINT`.

Storage driver: overlay2 when the kernel and the backing filesystem allow it, else
vfs (which copies every layer: ~15x slower builds and ~7x the disk here).
``FMC_DOCKER_STORAGE_DRIVER=vfs`` forces one. ``FMC_CONTAINER_CACHE`` moves the
cache (daemon data, logs); default ``${XDG_CACHE_HOME:-~/.cache}/fmc/container``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

log = logging.getLogger("fmc.tests.container")

REPO = Path(__file__).resolve().parents[2]
MAKE_BASE = Path(__file__).resolve().parent / "make_base_image.sh"
# Test tags, so a developer's own `fmc` / `fmc-train` images are never overwritten.
IMAGE = "fmc-citest"
TRAIN_IMAGE = "fmc-train-citest"
RUN_DIR = Path("/run/fmc-docker")  # short paths: unix sockets are limited to 108 bytes
ENGINE_VARIABLE = "FMC_CONTAINER_ENGINE"
ENABLE_HINT = (
    "the container tests need a Docker engine and a stand-in base image; set "
    f"{ENGINE_VARIABLE}=install to let the suite (as root) install docker.io and debootstrap, "
    "start a private dockerd and build the stand-in (CI does this: CI=true)"
)


def may_change_machine() -> bool:
    """True in CI (``CI`` set, not ``false``/``0``) or when ``FMC_CONTAINER_ENGINE=install`` asks.

    Why: the README's test command must change nothing on a user's machine unless asked, while
    CI, on a fresh machine without an engine, must still build and run the real images.
    """
    ci = os.environ.get("CI", "").strip().lower()
    return ci not in ("", "0", "false", "no") or os.environ.get(ENGINE_VARIABLE, "").strip() == "install"


def cache_dir() -> Path:
    explicit = os.environ.get("FMC_CONTAINER_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fmc" / "container"


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Docker:
    """How to reach the engine the tests use, and what this session did to it."""

    env: dict[str, str]
    base_image: str = ""
    started: subprocess.Popen | None = None
    driver: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def run(
        self,
        args: Sequence[str | Path],
        *,
        timeout: float = 600,
        check: bool = True,
        input: str | None = None,
        extra_env: dict[str, str] | None = None,
        cwd: Path = REPO,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command (docker, or one of the repository's scripts) against this engine."""
        env = {**self.env, **(extra_env or {})}
        proc = subprocess.run(
            [str(a) for a in args],
            env=env,
            cwd=cwd,
            input=input,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(map(str, args))} exited with {proc.returncode}:\n{tail(proc.stdout)}")
        return proc


def _quiet(args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 30) -> bool:
    try:
        return (
            subprocess.run(
                args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def apt_install(packages: Sequence[str]) -> None:
    """Install Debian packages (root only); refresh the lists once when the first try fails."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    if subprocess.run(cmd, env=env, capture_output=True, check=False).returncode == 0:
        return
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"apt-get install {' '.join(packages)} failed:\n{tail(proc.stdout + proc.stderr)}")


def _pid_alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


def start_dockerd(cache: Path) -> tuple[subprocess.Popen, str, dict[str, str]]:
    """Start a private dockerd (overlay2, else vfs) and return it once it answers."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    sock = RUN_DIR / "docker.sock"
    pidfile = RUN_DIR / "dockerd.pid"
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}"}
    forced = os.environ.get("FMC_DOCKER_STORAGE_DRIVER")
    drivers = [forced] if forced else ["overlay2", "vfs"]
    for driver in drivers:
        if pidfile.exists() and not _pid_alive(pidfile):
            pidfile.unlink()  # left by a daemon that did not shut down cleanly
        logfile = cache / f"dockerd-{driver}.log"
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(
                [
                    shutil.which("dockerd") or "dockerd",
                    f"--storage-driver={driver}",
                    "--iptables=false",
                    "--bridge=none",
                    f"--data-root={cache / f'docker-{driver}'}",
                    f"--exec-root={RUN_DIR / 'exec'}",
                    f"--pidfile={pidfile}",
                    f"--host=unix://{sock}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if _quiet(["docker", "info"], env=env, timeout=10):
                log.info("dockerd (%s) answers on %s", driver, sock)
                return proc, driver, env
            time.sleep(0.5)
        log.warning("dockerd with %s did not start (see %s)", driver, logfile)
        stop_dockerd(proc)
    pytest.fail(f"dockerd did not start with {drivers}; logs in {cache}")


def stop_dockerd(proc: subprocess.Popen) -> None:
    """Stop the daemon this session started, then undo mounts it left behind."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    prefixes = (str(RUN_DIR) + "/", str(cache_dir()) + "/")
    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefixes)]
    for point in sorted(points, key=len, reverse=True):
        if not _quiet(["umount", point]):
            _quiet(["umount", "-l", point])


def ensure_engine(cache: Path) -> Docker:
    """Use a running engine when there is one; otherwise (root, and only where
    :func:`may_change_machine`) install and start one."""
    is_root = os.geteuid() == 0
    allowed = may_change_machine()
    if shutil.which("docker") is None:
        if not allowed:
            pytest.skip(ENABLE_HINT)
        if not is_root:
            pytest.skip("the Docker CLI is missing and installing docker.io needs root")
        apt_install(["docker.io"])
    if _quiet(["docker", "info"]):
        return Docker(env=dict(os.environ))
    own = {**os.environ, "DOCKER_HOST": f"unix://{RUN_DIR / 'docker.sock'}"}
    if _quiet(["docker", "info"], env=own):
        return Docker(env=own)  # left running by someone else: use it, do not stop it
    if not allowed:
        pytest.skip(ENABLE_HINT)
    if not is_root:
        pytest.skip("no Docker daemon answers and starting dockerd needs root")
    if shutil.which("dockerd") is None:
        apt_install(["docker.io"])
    cache.mkdir(parents=True, exist_ok=True)
    proc, driver, env = start_dockerd(cache)
    return Docker(env=env, started=proc, driver=driver)


def ensure_base_image(docker: Docker) -> str:
    """The stand-in base tag, made with make_base_image.sh unless it is cached."""
    tag = docker.run(["bash", MAKE_BASE, "--tag-only"]).stdout.strip().splitlines()[-1]
    if _quiet(["docker", "image", "inspect", tag], env=docker.env):
        return tag
    if not may_change_machine():
        pytest.skip(ENABLE_HINT)
    if os.geteuid() != 0:
        pytest.skip(f"stand-in base {tag} is not cached and debootstrap needs root")
    if shutil.which("debootstrap") is None:
        apt_install(["debootstrap"])
    proc = docker.run(["bash", MAKE_BASE], timeout=1800)
    return proc.stdout.strip().splitlines()[-1]


def tidy(docker: Docker) -> None:
    """Keep the cache bounded: drop dangling layers and stand-ins of older recipes.

    Under vfs every layer is a full copy (~17 GB for both test images), so the test
    images go too and only the stand-in base stays cached.
    """
    if docker.driver == "vfs":
        docker.run(["docker", "image", "rm", IMAGE, TRAIN_IMAGE], check=False)
    if docker.started is None and not may_change_machine():
        return  # a user's own engine: their dangling images and stand-ins are theirs
    docker.run(["docker", "image", "prune", "-f"], check=False)
    listing = docker.run(["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}"], check=False)
    for ref in listing.stdout.split():
        if ref.startswith("fmc-standin-base:") and ref != docker.base_image:
            docker.run(["docker", "image", "rm", ref], check=False)


@pytest.fixture(scope="session")
def docker() -> Iterator[Docker]:
    """A working Docker engine and the stand-in base image (see the module docstring)."""
    if sys.platform != "linux":
        pytest.skip("the container tests need Linux")
    cache = cache_dir()
    start = time.monotonic()
    engine = ensure_engine(cache)
    engine.timings["engine_s"] = time.monotonic() - start
    try:
        start = time.monotonic()
        engine.base_image = ensure_base_image(engine)
        engine.timings["base_image_s"] = time.monotonic() - start
        engine.env["FMC_CONTAINER_CACHE"] = str(cache)
        yield engine
    finally:
        tidy(engine)
        if engine.started is not None:
            stop_dockerd(engine.started)
        if cache.is_dir():  # made by this session's dockerd or an earlier stand-in build
            (cache / "last_session.json").write_text(
                json.dumps({"driver": engine.driver or "existing", **engine.timings}, indent=2)
            )


@pytest.fixture(scope="session")
def images(docker: Docker) -> tuple[str, str]:
    """Both real Dockerfiles built by ./build.sh on the stand-in base (tags IMAGE, TRAIN_IMAGE)."""
    start = time.monotonic()
    docker.run(
        ["./build.sh"],
        timeout=3600,
        extra_env={
            "BASE_IMAGE": docker.base_image,
            "DOCKER_BUILD_ARGS": "--network host",
            "FMC_IMAGE": IMAGE,
            "FMC_TRAIN_IMAGE": TRAIN_IMAGE,
        },
    )
    docker.timings["build_s"] = time.monotonic() - start
    return IMAGE, TRAIN_IMAGE
