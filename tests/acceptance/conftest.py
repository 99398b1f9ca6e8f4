"""The product run as a user runs it: README.md's command blocks, verbatim, in a subprocess shell.

How a block is found: README.md marks each runnable block with an HTML comment on the line before
its fence, ``<!-- acceptance: NAME (notes) -->``; :func:`readme_block` returns the block's text as
it stands in README.md (so the README and what CI runs cannot drift apart).

How a block is run (:class:`User`): ``bash -c 'set -e; <block>'`` in a fresh, empty working
directory, with a fresh, empty ``HOME`` and an environment built from scratch (no ``RAY_*`` or
``AWS_*`` variable of the test process leaks in) in which only these are set:

* ``PATH`` with this interpreter's ``bin/`` first: what ``. .venv/bin/activate`` does. The venv
  and ``pip install`` part of README commands (1) and (2) is NOT run (minutes of pip per test);
  the tests strip that prefix after asserting it is exactly the install part.
* ``PYTHONPATH`` when the test process has one (a development worktree), made absolute.
* ``RAY_TMPDIR``: a private, short directory (Ray's socket paths must stay under 107 bytes, so it
  lives in /tmp, not under pytest's long tmp_path), so that the credentials grep covers everything
  Ray wrote for this run and no other Ray on the machine is seen. Removed afterwards.
* whatever the test passes (``BUCKET``, ``AWS_ENDPOINT_URL``, credentials).

Everything a command prints relatively (``./runs/...``) is resolved against the working directory
the command ran in, which is where a user would look. Processes left behind by a run (a Ray
instance of a killed command) are ended by pid, found by the private RAY_TMPDIR in their command
line.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent

_MARKER = re.compile(r"<!--\s*acceptance:\s*([\w-]+)(.*?)-->\s*\n```(\w*)\n(.*?)\n```", re.S)


@dataclass
class Block:
    name: str
    lang: str
    text: str
    note: str  # the marker's text after the name: says which CI overrides apply


def readme_blocks() -> dict[str, Block]:
    found: dict[str, Block] = {}
    for m in _MARKER.finditer(README.read_text()):
        name = m.group(1)
        assert name not in found, f"README.md: two blocks marked 'acceptance: {name}'"
        found[name] = Block(name, m.group(3), m.group(4), m.group(2).strip())
    return found


def readme_block(name: str) -> Block:
    blocks = readme_blocks()
    assert name in blocks, f"README.md has no block marked 'acceptance: {name}' (have {sorted(blocks)})"
    return blocks[name]


def append_overrides(script: str, command: str, overrides: str, note: str) -> str:
    """``overrides`` appended to every line of ``script`` that runs ``command`` (before a trailing
    ``# comment``). The README's marker must name the same overrides (``note``)."""
    assert overrides in note, f"README marker says {note!r}, the test appends {overrides!r} to {command!r}"
    out, hits = [], 0
    for line in script.splitlines():
        if line.startswith(command + " ") or line == command:
            code, sep, comment = line.partition("  #")
            line = f"{code.rstrip()} {overrides}" + (f"  {sep.strip()}{comment}" if sep else "")
            hits += 1
        out.append(line)
    assert hits, f"no line of the block runs {command!r}"
    return "\n".join(out)


def json_lines(out: str, key: str) -> list[dict]:
    """The JSON objects printed as whole lines that have ``key``."""
    found = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{") and f'"{key}"' in line:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and key in obj:
                found.append(obj)
    return found


def last_json(out: str, key: str) -> dict:
    found = json_lines(out, key)
    assert found, f"no JSON line with {key!r} in the output:\n{out[-4000:]}"
    return found[-1]


def scalar_tags(logdir: str | Path) -> dict[str, int]:
    """tag -> number of values, over every event file under ``logdir`` (read back by TensorBoard)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, int] = {}
    dirs = sorted({p.parent for p in Path(logdir).rglob("events.out.tfevents.*")})
    for d in dirs:
        ea = EventAccumulator(str(d), size_guidance={"scalars": 0, "tensors": 0})
        ea.Reload()
        for t in ea.Tags()["scalars"]:
            tags[t] = tags.get(t, 0) + len(ea.Scalars(t))
        for t in ea.Tags().get("tensors", []):  # scalars written through the tensor summary path
            tags.setdefault(t, len(ea.Tensors(t)))
    return tags


def files_containing(roots: list[Path], needle: bytes) -> list[str]:
    """Every regular file under ``roots`` whose bytes contain ``needle``."""
    hits = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = os.path.join(dirpath, n)
                try:
                    if not os.path.isfile(p) or os.path.islink(p):
                        continue
                    with open(p, "rb") as f:
                        if needle in f.read():
                            hits.append(p)
                except OSError:
                    continue
    return hits


@dataclass
class Result:
    returncode: int
    out: str      # stdout and stderr together, as a terminal shows them
    stdout: str
    stderr: str


@dataclass
class User:
    """A new user: an empty working directory, an empty HOME, a private Ray temp dir."""

    workdir: Path
    home: Path
    ray_tmp: Path
    env_extra: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        env = {"PATH": f"{BIN}{os.pathsep}/usr/local/bin:/usr/bin:/bin", "HOME": str(self.home),
               "LANG": os.environ.get("LANG", "C.UTF-8"), "RAY_TMPDIR": str(self.ray_tmp),
               "VIRTUAL_ENV": str(BIN.parent)}
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in
                                                os.environ["PYTHONPATH"].split(os.pathsep) if p)
        env.update(self.env_extra)
        env.update(extra)
        return env

    def run(self, script: str, *, timeout: float, cwd: Path | None = None, **extra: str) -> Result:
        """``bash -c 'set -e; script'``; on timeout the whole process group is killed and the
        test fails with the output so far."""
        proc = subprocess.Popen(["bash", "-c", "set -e\n" + script], cwd=cwd or self.workdir,
                                env=self.env(**extra), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            self.cleanup_processes()
            pytest.fail(f"`{script.strip()[:200]}` did not finish within {timeout:.0f}s:\n"
                        f"{(stdout + stderr)[-4000:]}")
        self.cleanup_processes()
        return Result(proc.returncode, stdout + stderr, stdout, stderr)

    def cleanup_processes(self) -> None:
        """End the processes this user's commands started and left (a Ray instance of a killed
        command), by pid: their command line or environment names our private RAY_TMPDIR."""
        mine = str(self.ray_tmp)
        for pid in _pids_mentioning(mine):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:  # the command line (Ray's processes) or the environment (the cacr driver)
            found = any(text.encode() in (d / f).read_bytes() for f in ("cmdline", "environ"))
        except OSError:
            continue
        if found:
            pids.append(int(d.name))
    return pids


def new_user(base: Path) -> User:
    work, home = base / "work", base / "home"
    work.mkdir(parents=True)
    home.mkdir(parents=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="acc", dir="/tmp"))
    return User(work, home, ray_tmp)


def drop_user(user: User) -> None:
    user.cleanup_processes()
    time.sleep(0.5)
    shutil.rmtree(user.ray_tmp, ignore_errors=True)


def copy_checkout_configs(user: User) -> None:
    """What a user's working directory (a clone) has besides the code: conf/. Nothing else (no
    data/, no runs/, no ~/.ray)."""
    shutil.copytree(ROOT / "conf", user.workdir / "conf")


@pytest.fixture
def user(tmp_path):
    u = new_user(tmp_path)
    yield u
    drop_user(u)


@pytest.fixture(scope="module")
def module_user(tmp_path_factory):
    u = new_user(tmp_path_factory.mktemp("user"))
    yield u
    drop_user(u)


def resolve(path: str, cwd: Path) -> Path:
    """A printed path as the user reads it: relative to where the command ran."""
    assert path and "://" not in path, f"expected a local path, got {path!r}"
    p = Path(path)
    return p if p.is_absolute() else cwd / p


@pytest.fixture(scope="session")
def acc():
    """The helpers above, for the test modules (pytest's importlib mode does not let a test
    module import its conftest)."""
    import types

    return types.SimpleNamespace(
        ROOT=ROOT, README=README, readme_block=readme_block, readme_blocks=readme_blocks,
        append_overrides=append_overrides, json_lines=json_lines, last_json=last_json,
        scalar_tags=scalar_tags, files_containing=files_containing, resolve=resolve,
        copy_checkout_configs=copy_checkout_configs, new_user=new_user, drop_user=drop_user)
