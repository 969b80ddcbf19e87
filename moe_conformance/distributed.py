"""Running part of a check on several torch.distributed ranks, and the expert-parallel run.

**The launcher** (:func:`start` / :class:`Launch`): one launcher process (``python -m
moe_conformance.distributed JOB_DIR``, in a process group of its own) imports torch, the arch
plugin and transformers once, runs the job's ``prepare`` function (building the models on the
CPU: no accelerator is touched before the fork), then forks one process per rank. Each rank
sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as torchrun would, joins the process group through a
file store in the job folder (gloo on CPU, NCCL with one GPU per rank; NVLink multicast stays
off in every child: ``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``,
``NVSHMEM_DISABLE_NVLS=1``), runs the job's ``task`` and writes its result. Starting four ranks
this way costs one import of the stack instead of four (on two busy cores, ~10 s instead of ~50).

The parent holds the launch to a hard timeout and watches every rank: a rank that exits
without its result, raises, or hangs fails the launch with :class:`LaunchFailed` naming the
rank, its last stage, and (for a hang) where each rank was, read from a faulthandler dump
(a rank waiting in a collective is told from the one that never reached it). However the
launch ends, its whole process group is killed; the ranks also die with their launcher
(``PR_SET_PDEATHSIG``), and the launcher with the parent.

**The expert-parallel run** (:func:`run_expert_parallel`): the parent converts the case's
checkpoint and draws the inputs; the launcher rebuilds the same case from its plugin (an
``ArchCase`` is deterministic from (seed, variant)) and loads the parent's converted weights;
every rank, forked from it, shards a copy of the full candidate through the plugin's
``ExpertParallel.shard`` for each world size (w on ranks 0..w-1) and runs its rows:
the experts module alone on drawn choices (spread, one hot expert, the first experts only, a
rank with no tokens), then a forward+backward of the language-modelling loss (each rank's loss
its share of the batch mean), the declared gradient reduction, aux loss and bias update. The
parent computes the same on one process (candidate and reference) while the ranks run; the
``expert_parallel`` suite compares.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Every child environment (the launcher's and so the ranks'): NVLink multicast off (it can take
# a shared host's GPUs out of service), one intra-op thread per rank.
CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
             "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STARTUP_TIMEOUT = 150.0  # importing torch + transformers + the plugin and preparing, before the fork
POLL = 0.05
_COLLECTIVE_FILES = ("torch/distributed/", "torch\\distributed\\")


class LaunchFailed(RuntimeError):
    """A launch failed; the message names the rank(s). ``ranks``: the culprits; ``pids``: every
    process the launch started (all killed by the time this is raised)."""

    def __init__(self, message: str, ranks: list[int] = (), pids: list[int] = ()):
        super().__init__(message)
        self.ranks, self.pids = list(ranks), list(pids)


# --------------------------------------------------------------------------------------------
# Parent side


def _free_of_multicast(env: dict[str, str]) -> dict[str, str]:
    return {**env, **CHILD_ENV}


@dataclass
class Launch:
    """A running launch: ``wait()`` returns the ranks' results in rank order or raises
    :class:`LaunchFailed`; the processes are gone either way."""

    folder: Path
    nprocs: int
    timeout: float
    startup_timeout: float
    proc: subprocess.Popen
    started: float = field(default_factory=time.monotonic)
    keep: bool = False
    _pids: dict[int, int] = field(default_factory=dict)

    def _read(self, name: str) -> str:
        try:
            return (self.folder / name).read_text(errors="replace")
        except OSError:
            return ""

    def pids(self) -> dict[int, int]:
        """The ranks' pids (those that have started), remembered once the folder is gone."""
        for r in range(self.nprocs):
            text = self._read(f"rank{r}.pid").strip()
            if text.isdigit():
                self._pids[r] = int(text)
        return dict(self._pids)

    def all_pids(self) -> list[int]:
        return [self.proc.pid, *self.pids().values()]

    def exits(self) -> list[dict]:
        """Rank exits as the launcher saw them, in order: {rank, code, t}."""
        out = []
        for line in self._read("exits.jsonl").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stage(self, r: int) -> str:
        return self._read(f"rank{r}.stage").strip() or "starting"

    def log_tail(self, r: int | None, lines: int = 12) -> str:
        text = self._read("launcher.log" if r is None else f"rank{r}.log")
        text = re.sub(r"(?ms)^(?:Current thread|Thread) 0x[0-9a-f]+.*?(?=^\S|\Z)", "", text)  # stack dumps
        return "\n".join(text.strip().splitlines()[-lines:])

    def wait(self) -> list[Any]:
        import torch

        try:
            return self._wait(torch)
        finally:
            self.kill()
            if _WARM["left"] > 0:  # the next launch's launcher imports while the checks go on
                prestart(_WARM["plugins"])

    def _wait(self, torch) -> list[Any]:
        ready_at = None
        while True:
            exits = self.exits()  # before the results: a rank writes its result, then exits
            done = [r for r in range(self.nprocs) if (self.folder / f"rank{r}.pt").exists()]
            if len(done) == self.nprocs:
                return [torch.load(self.folder / f"rank{r}.pt", weights_only=True) for r in range(self.nprocs)]
            failed = [e for e in exits if e["code"] != 0 or e["rank"] not in done]
            if failed:
                time.sleep(0.3)  # let the others' errors land: the first to exit is the culprit
                exits = self.exits()
                raise self._crash(exits, [r for r in range(self.nprocs) if (self.folder / f"rank{r}.pt").exists()])
            if ready_at is None and (self.folder / "ready").exists():
                ready_at = time.monotonic()
            code = self.proc.poll()
            if code is not None and len(done) < self.nprocs and not failed:
                time.sleep(0.2)
                if self.exits():
                    continue
                raise LaunchFailed(f"the launcher exited with code {code} before the ranks finished "
                                   f"({len(done)} of {self.nprocs} results):\n{self.log_tail(None)}",
                                   pids=self.all_pids())
            now = time.monotonic()
            if ready_at is None and now - self.started > self.startup_timeout:
                raise LaunchFailed(f"the launcher did not start the {self.nprocs} ranks within {self.startup_timeout:g} s "
                                   f"(importing torch, transformers and the plugin, building the case):\n"
                                   f"{self.log_tail(None)}", pids=self.all_pids())
            if ready_at is not None and now - ready_at > self.timeout:
                raise self._hang(done)
            time.sleep(POLL)

    def _failed_at(self, e: dict) -> float:
        """When a rank failed: its error file's time (written before it exits) or its exit."""
        try:
            return min(e["t"], (self.folder / f"rank{e['rank']}.error").stat().st_mtime)
        except OSError:
            return e["t"]

    def _crash(self, exits: list[dict], done: list[int]) -> LaunchFailed:
        exits = sorted(exits, key=self._failed_at)
        failed = [e for e in exits if e["code"] != 0 or e["rank"] not in done]
        # the culprit: the first rank that failed on its own, not one that lost its peer (the
        # others' collectives fail as soon as it is gone, and reaping order proves nothing)
        first = next((e for e in failed if not _knock_on(self._read(f"rank{e['rank']}.error"))), failed[0])
        r = first["rank"]
        error = self._read(f"rank{r}.error").strip()
        how = (f"raised {error.splitlines()[-1][:300]}" if error else
               f"exited with code {first['code']}" + (" (killed by signal %d)" % -first["code"] if first["code"] < 0 else "")
               + " without writing its result")
        where = _innermost_user_frame(error) if error else ""
        lines = [f"rank {r} {how}" + (f" at {where}" if where else "") + f" (stage: {self.stage(r)})"]
        tail = self.log_tail(r, 6)
        if tail and not error:
            lines.append(f"rank {r}'s last output:\n    " + tail.replace("\n", "\n    "))
        others = [e for e in exits if e["rank"] != r]
        for e in others:
            err = self._read(f"rank{e['rank']}.error").strip()
            what = f"then raised {err.splitlines()[-1][:200]}" if err else f"then exited with code {e['code']}"
            if e["code"] == 0 and e["rank"] in done:
                what = "had finished"
            lines.append(f"rank {e['rank']} {what} (stage: {self.stage(e['rank'])})")
        alive = [q for q in range(self.nprocs) if q != r and q not in {e["rank"] for e in exits}]
        if alive:
            lines.append(f"rank(s) {', '.join(map(str, alive))} still running (stage: "
                         + "; ".join(f"{q}: {self.stage(q)}" for q in alive) + ")")
        lines.append(f"every process of the launch was killed (pids {', '.join(map(str, self.all_pids()))})")
        return LaunchFailed("; ".join(lines[:1]) + ("\n  " + "\n  ".join(lines[1:]) if len(lines) > 1 else ""),
                            ranks=[r], pids=self.all_pids())

    def _hang(self, done: list[int]) -> LaunchFailed:
        pids = self.pids()
        exited = {e["rank"] for e in self.exits()}
        live = [r for r in range(self.nprocs) if r not in done and r not in exited and r in pids]
        for r in live:  # faulthandler dumps every thread's stack into the rank's log
            try:
                os.kill(pids[r], signal.SIGUSR1)
            except ProcessLookupError:
                pass
        time.sleep(0.8)
        where = {r: _dumped_stack(self._read(f"rank{r}.log")) for r in live}
        blocked = [r for r in live if where[r] and not where[r]["collective"]]
        waiting = [r for r in live if where[r] and where[r]["collective"]]
        unknown = [r for r in live if not where[r]]
        culprits = blocked or unknown or live
        lines = []
        for r in culprits:
            at = where[r]
            spot = f" in {at['frame']}, outside any collective" if at and not at["collective"] else (
                f" waiting in torch.distributed {at['collective']} (called from {at['frame']})" if at else "")
            lines.append(f"rank {r} hung: no result {self.timeout:g} s after the ranks started (ExpertParallel.timeout)"
                         f"; stage: {self.stage(r)}{spot}")
        for r in waiting:
            if r in culprits:
                continue
            lines.append(f"rank {r} was waiting in torch.distributed {where[r]['collective']} (called from "
                         f"{where[r]['frame']}; stage: {self.stage(r)})"
                         + (f" for rank(s) {', '.join(map(str, blocked))}" if blocked else ""))
        if done:
            lines.append(f"rank(s) {', '.join(map(str, done))} had finished")
        if not blocked and waiting:
            lines.append("every live rank waits in a collective: they disagree on which collectives to run, or on "
                         "their sizes")
        lines.append(f"every process of the launch was killed (pids {', '.join(map(str, self.all_pids()))})")
        return LaunchFailed(lines[0] + ("\n  " + "\n  ".join(lines[1:]) if len(lines) > 1 else ""),
                            ranks=culprits, pids=self.all_pids())

    def kill(self) -> None:
        """Kill every rank (its launcher reaps it: no zombie is left), then the launch's whole
        process group (the launcher, and anything a rank started), and reap the launcher."""
        ranks = self.pids()
        if self.proc.poll() is None:
            # only ranks the (live) launcher has not reaped: a reaped pid may belong to someone else now
            reaped = {e["rank"] for e in self.exits()}
            for r, pid in ranks.items():
                if r not in reaped:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
        deadline = time.monotonic() + 3.0
        while ranks and self.proc.poll() is None and time.monotonic() < deadline:
            if {e["rank"] for e in self.exits()} >= set(ranks):
                break
            time.sleep(POLL)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if not self.keep:
            shutil.rmtree(self.folder, ignore_errors=True)


def start(task: str, payload: dict, nprocs: int, *, prepare: str | None = None, backend: str = "gloo",
          device: str = "cpu", timeout: float = 120.0, startup_timeout: float = STARTUP_TIMEOUT) -> Launch:
    """Start ``nprocs`` ranks running ``task`` (``"module:function"``, called in each rank as
    ``task(rank: Rank, prepared)``, returning what torch.save can write with weights_only);
    ``prepare`` (``"module:function"``, called once in the launcher as ``prepare(payload)``
    before the fork) builds what every rank starts from. ``payload``: tensors and plain Python
    values. ``timeout`` counts from the fork; the parent's ``sys.path`` and working folder are
    the ranks'."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available() or torch.cuda.device_count() < nprocs:
            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise LaunchFailed(f"{nprocs} ranks need {nprocs} GPUs (one per rank); {found} visible")
        backend = "nccl" if backend == "gloo" else backend
    job = {"task": task, "prepare": prepare, "payload": payload, "nprocs": nprocs, "backend": backend,
           "device": device, "timeout": float(timeout), "sys_path": [p for p in sys.path if isinstance(p, str)],
           "parent": os.getpid(), "env": _free_of_multicast(dict(os.environ))}
    _WARM["left"] = max(0, _WARM["left"] - 1)
    spare = _take_spare()
    if spare is not None:  # a launcher already started and importing (prestart): hand it the job
        folder, proc = spare
        torch.save(job, folder / "job.pt.tmp")
        os.replace(folder / "job.pt.tmp", folder / "job.pt")
    else:
        folder = Path(tempfile.mkdtemp(prefix="moe-conformance-dist-"))
        torch.save(job, folder / "job.pt")
        proc = _spawn_launcher(folder)
    return Launch(folder, nprocs, float(timeout), float(startup_timeout), proc,
                  keep=bool(os.environ.get("MOE_CONFORMANCE_KEEP_DIST_DIR")))


def _spawn_launcher(folder: Path) -> subprocess.Popen:
    log = open(folder / "launcher.log", "wb")
    try:
        return subprocess.Popen([sys.executable, "-m", "moe_conformance.distributed", str(folder)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, env=_free_of_multicast(dict(os.environ)),
                                cwd=os.getcwd(), process_group=0)
    finally:
        log.close()


# A launcher started ahead of its job: it imports torch, transformers and the plugins while other
# checks run, then waits for job.pt. Most of a launch was that import (about 3 of kimi_k25's
# 4.3 s on 2 cores); started early, it overlaps the checks before the expert-parallel family.
_SPARE: tuple[Path, subprocess.Popen] | None = None
_WARM: dict[str, Any] = {"left": 0, "plugins": []}


def keep_warm(launches: int, plugin_sources: list[dict[str, str]]) -> None:
    """This process expects up to ``launches`` launches of these plugins' archs: start a spare
    now, and another after each launch while more are expected."""
    _WARM.update(left=launches, plugins=list(plugin_sources))
    if launches > 0:
        prestart(plugin_sources)


def prestart(plugin_sources: list[dict[str, str]] = ()) -> None:
    """Start a launcher for this process's next ``start`` (none if one is waiting), importing
    ``plugin_sources`` (see ``plugin_source``) in advance. ``stop_spare`` ends it unused."""
    global _SPARE
    if _SPARE is not None and _SPARE[1].poll() is None:
        return
    folder = Path(tempfile.mkdtemp(prefix="moe-conformance-dist-"))
    (folder / "spare.json").write_text(json.dumps({"parent": os.getpid(), "plugins": list(plugin_sources),
                                                   "sys_path": [p for p in sys.path if isinstance(p, str)]}))
    _SPARE = (folder, _spawn_launcher(folder))


def _take_spare() -> tuple[Path, subprocess.Popen] | None:
    global _SPARE
    spare, _SPARE = _SPARE, None
    if spare is not None and spare[1].poll() is not None:  # it died waiting (its log says why): start afresh
        shutil.rmtree(spare[0], ignore_errors=True)
        return None
    return spare


def stop_spare() -> None:
    """End the waiting spare, if any, and start no more (the session is over)."""
    _WARM["left"] = 0
    spare = _take_spare()
    if spare is not None:
        folder, proc = spare
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(folder, ignore_errors=True)


def launch(task: str, payload: dict, nprocs: int, **options: Any) -> list[Any]:
    """:func:`start`, then :meth:`Launch.wait`."""
    return start(task, payload, nprocs, **options).wait()


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing", "Broken pipe",
              "communicator was aborted", "NCCL communicator", "Socket Timeout", "Timed out waiting")


def _knock_on(error: str) -> bool:
    """A rank's error that only says a peer went away (the collective's other side died)."""
    last = error.strip().splitlines()[-1] if error.strip() else ""
    return any(p in last for p in _PEER_LOST)


_FRAME = re.compile(r'^\s+File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)', re.M)


def _dumped_stack(log: str) -> dict | None:
    """The last faulthandler dump's main-thread stack: its innermost frame outside
    torch.distributed and, if the rank was inside a torch.distributed call, which one."""
    blocks = re.split(r"(?m)^(?=(?:Current thread|Thread) 0x)", log)
    dumps = [b for b in blocks if b.startswith(("Current thread", "Thread 0x"))]
    if not dumps:
        return None
    main = next((b for b in reversed(dumps) if b.startswith("Current thread")), dumps[-1])
    frames = [m.groupdict() for m in _FRAME.finditer(main)]  # most recent call first
    if not frames:
        return None
    collective = None
    for f in frames:
        if any(part in f["file"] for part in _COLLECTIVE_FILES):
            if f["func"] not in ("wrapper", "_check_single_tensor"):
                collective = collective or f["func"]
        else:
            return {"frame": f"{Path(f['file']).name}:{f['line']} in {f['func']}", "collective": collective}
    f = frames[0]
    return {"frame": f"{Path(f['file']).name}:{f['line']} in {f['func']}", "collective": collective}


def _innermost_user_frame(tb: str) -> str:
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', tb)
    for file, line, func in reversed(frames):
        if not any(part in file for part in _COLLECTIVE_FILES) and "moe_conformance/distributed.py" not in file:
            return f"{Path(file).name}:{line} in {func}"
    return ""


# --------------------------------------------------------------------------------------------
# Launcher and rank side


@dataclass
class Rank:
    """What a task gets in its rank: ``rank`` and ``world_size`` of the launch (the default
    group), its ``device``, the job's ``payload``, and ``stage(text)`` to say where it is (named
    in failure messages)."""

    rank: int
    world_size: int
    device: Any
    backend: str
    payload: dict
    folder: Path

    def stage(self, text: str) -> None:
        tmp = self.folder / f"rank{self.rank}.stage.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.folder / f"rank{self.rank}.stage")


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux), and leave now if it already has."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the parent's process-group kill still holds
        pass
    if os.getppid() != parent:
        os._exit(3)


def _resolve(ref: str):
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _rank_main(folder: Path, job: dict, r: int, prepared: Any) -> None:
    import datetime
    import faulthandler

    log = os.open(folder / f"rank{r}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    (folder / f"rank{r}.pid").write_text(str(os.getpid()))
    n = job["nprocs"]
    os.environ.update({"RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(n)})
    import torch
    import torch.distributed as dist

    ctx = Rank(r, n, torch.device("cpu"), job["backend"], job["payload"], folder)
    try:
        ctx.stage("init_process_group")
        if job["device"].startswith("cuda"):
            torch.cuda.set_device(r)
            ctx.device = torch.device("cuda", r)
        dist.init_process_group(job["backend"], init_method=f"file://{folder / 'store'}", rank=r, world_size=n,
                                timeout=datetime.timedelta(seconds=job["timeout"] + 60))
        result = _resolve(job["task"])(ctx, prepared)
        ctx.stage("writing the result")
        tmp = folder / f"rank{r}.pt.tmp"
        torch.save(result, tmp)
        os.replace(tmp, folder / f"rank{r}.pt")
        ctx.stage("done")
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the result is written
            pass
        code = 0
    except BaseException:  # noqa: BLE001 - reported to the parent through the error file
        text = traceback.format_exc()
        sys.stderr.write(text)
        (folder / f"rank{r}.error").write_text(text)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _wait_for_job(folder: Path) -> None:
    """A spare launcher: import what a launch needs, then wait for the job (or the parent's end)."""
    spare = json.loads((folder / "spare.json").read_text())
    _die_with_parent(spare["parent"])
    for p in reversed(spare["sys_path"]):
        if p not in sys.path:
            sys.path.insert(0, p)
    import torch.distributed  # noqa: F401

    from . import case, training  # noqa: F401 - what _ep_prepare and the ranks import
    for source in spare["plugins"]:
        try:
            load_spec(source, "")
        except Exception:  # noqa: BLE001 - the launch itself imports it again and reports
            pass
    while not (folder / "job.pt").exists():
        if os.getppid() != spare["parent"]:
            os._exit(3)
        time.sleep(0.01)


def _launcher_main(folder: Path) -> None:
    job_path = folder / "job.pt"
    import torch

    torch.set_num_threads(1)  # before any op: the ranks are forked from this process
    if (folder / "spare.json").exists():
        _wait_for_job(folder)
    job = torch.load(job_path, weights_only=True)
    os.environ.update(job["env"])  # a spare was started before the job: the job's environment holds
    _die_with_parent(job["parent"])
    for p in reversed(job["sys_path"]):
        if p not in sys.path:
            sys.path.insert(0, p)
    prepared = _resolve(job["prepare"])(job["payload"]) if job.get("prepare") else None
    children: dict[int, int] = {}
    me = os.getpid()
    for r in range(job["nprocs"]):
        pid = os.fork()
        if pid == 0:
            _die_with_parent(me)
            _rank_main(folder, job, r, prepared)
        children[pid] = r
    (folder / "ready").write_text(str(time.time()))
    with open(folder / "exits.jsonl", "a") as exits:
        while children:
            pid, status = os.wait()
            r = children.pop(pid, None)
            if r is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            exits.write(json.dumps({"rank": r, "code": code, "t": time.time()}) + "\n")
            exits.flush()


# --------------------------------------------------------------------------------------------
# The expert-parallel run


def plugin_source(spec) -> dict[str, str]:
    """Where a rank re-imports ``spec`` from: the plugin module that declares it (a file
    plugin's path, or an importable module's name)."""
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        arch, archs = namespace.get("ARCH"), namespace.get("ARCHS")
        if arch is spec or (isinstance(archs, (list, tuple)) and any(a is spec for a in archs)):
            file = namespace.get("__file__")
            if name.startswith("moe_conformance_plugin_") and file:
                return {"path": str(Path(file).resolve())}
            if name != "__main__":
                return {"module": name}
            if file:
                return {"path": str(Path(file).resolve())}
    raise LookupError(f"arch {spec.name!r}: no loaded plugin module defines it as ARCH or in ARCHS; the ranks rebuild "
                      f"the spec from its plugin, so declare it in a plugin module (a file or an importable module)")


def load_spec(source: dict[str, str], name: str):
    from . import registry

    if "path" in source:
        module = registry._import_path(Path(source["path"]), True)
        origin = source["path"]
    else:
        module = importlib.import_module(source["module"])
        origin = f"module {source['module']}"
    specs = registry._specs_of(module, origin)
    return next((s for s in specs if s.name == name), specs[0])


@dataclass(frozen=True)
class Scenario:
    """Drawn inputs of the experts module alone: T tokens [T, H], their choices, and how the
    tokens split over the ranks of each world size (``rows[w]``: per rank, [start, stop))."""

    name: str
    what: str
    idle_last_rank: bool = False


SCENARIOS = (
    Scenario("spread", "random distinct experts per token"),
    Scenario("hot_expert", "every token's first choice is the last expert (its rank receives every token)"),
    Scenario("first_experts", "every token chooses among the first top_k + 1 experts (the other ranks receive none)"),
    Scenario("idle_rank", "random choices, the last rank holds no token", idle_last_rank=True),
)
DISPATCH_TOKENS = 23
BATCH_SIZE = 8
BIAS_RATE = 0.02
DEFAULT_ROWS = -1  # located rows to be placed by the default rule (ExpertParallel.locate None)


def row_splits(n: int, world_size: int, idle_last: bool = False) -> list[tuple[int, int]]:
    """Contiguous near-even [start, stop) per rank; ``idle_last``: the last rank gets none."""
    parts = world_size - 1 if idle_last and world_size > 1 else world_size
    bounds = [i * n // parts for i in range(parts + 1)]
    out = [(bounds[i], bounds[i + 1]) for i in range(parts)]
    return out + [(n, n)] * (world_size - parts)


def _draw_scenario(scenario: Scenario, T: int, H: int, E: int, K: int, seed: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    if scenario.name == "first_experts":
        pool = min(K + 1, E)
        idx = torch.stack([torch.randperm(pool, generator=gen)[:K] for _ in range(T)])
    else:
        idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    if scenario.name == "hot_expert":
        hot = E - 1
        for t in range(T):
            row = [e for e in idx[t].tolist() if e != hot][: K - 1]
            idx[t] = torch.tensor([hot, *row])
    weights = torch.rand(T, K, generator=gen) * 0.8 + 0.2
    probe = torch.randn(T, H, generator=gen)
    return {"x": x, "indices": idx, "weights": weights, "probe": probe}


@dataclass
class EPRun:
    """What the ranks and the single process computed. ``ranks[w][r]``: rank r's figures in world
    size w; ``single``: the single-process candidate; ``reference``: transformers' model."""

    world_sizes: tuple[int, ...]
    ranks: dict[int, list[dict]]
    single: dict
    reference: dict
    inputs: dict
    error: str | None = None
    culprits: list[int] = field(default_factory=list)
    seconds: float = 0.0
    launch_seconds: float = 0.0


def _detach(t):
    return None if t is None else t.detach().cpu().clone()


def _experts_modules(case, model) -> list[tuple[Any, str, Any]]:
    from .probing import routing_layers

    modules = dict(model.named_modules())
    return [(layer.layer, layer.experts, modules[layer.experts]) for layer in routing_layers(case, "cand", model)
            if layer.experts and layer.experts in modules]


def _dispatch(case, model, scenario: dict, lo: int, hi: int, device) -> dict:
    """The experts module of every MoE layer on the scenario's rows [lo, hi): outputs and the
    gradients of the inputs and weights under the scenario's probe."""
    probe = case.spec.probes.experts
    out = {}
    for layer, name, module in _experts_modules(case, model):
        x = scenario["x"][lo:hi].to(device).requires_grad_()
        w = scenario["weights"][lo:hi].to(device).requires_grad_()
        y = probe.call(module, x, scenario["indices"][lo:hi].to(device), w)
        (y.float() * scenario["probe"][lo:hi].to(device)).sum().backward()
        out[name] = {"out": _detach(y), "grad_x": _detach(x.grad), "grad_weights": _detach(w.grad)}
    model.zero_grad(set_to_none=True)
    return out


def _slot_contributions(case, model, scenario: dict) -> dict:
    """Per layer, each slot's own term [T, K, H] (the experts module on that slot alone)."""
    import torch

    probe = case.spec.probes.experts
    out = {}
    with torch.no_grad():
        for layer, name, module in _experts_modules(case, model):
            K = scenario["indices"].shape[1]
            device = next(module.parameters()).device
            x, idx, w = (scenario[k].to(device) for k in ("x", "indices", "weights"))
            out[name] = torch.stack([probe.call(module, x, idx[:, k:k + 1], w[:, k:k + 1]).float().cpu()
                                     for k in range(K)], dim=1)
    return out


def _model_step(case, model, batch, n_labels: int, device) -> dict:
    """Forward (routing and experts outputs tapped) and backward of the rank's share of the
    batch's mean next-token loss."""
    import torch.nn.functional as F

    from .case import logits_of
    from .data import IGNORE
    from .probing import RoutingTap

    tap = RoutingTap(model, case, "cand")
    captured: dict[str, Any] = {}
    handles = [module.register_forward_hook(lambda m, a, o, name=name: captured.__setitem__(name, o))
               for _, name, module in _experts_modules(case, model)]
    kwargs = {k: v.to(device) for k, v in batch["kwargs"].items()}
    try:
        with tap():
            logits = logits_of(model(**kwargs))
    finally:
        for h in handles:
            h.remove()
    labels = batch["labels"].to(device)
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                         reduction="sum")
    loss = ce / n_labels
    return {"tap": tap, "logits": logits, "loss": loss, "experts_out": captured}


def _readings(tap) -> list[dict]:
    out = []
    for layer, reading in zip(tap.layers, tap.ordered()):
        out.append({"layer": layer.layer, "router": layer.router, "experts": layer.experts,
                    "indices": _detach(reading.indices), "weights": _detach(reading.weights),
                    "logits": _detach(reading.logits)})
    return out


def _ep_prepare(payload: dict):
    """In the launcher, before the fork: the case rebuilt from its plugin, and the full
    candidate loaded with the parent's converted checkpoint (on the CPU)."""
    from .case import ArchCase

    spec = load_spec(payload["source"], payload["arch"])
    case = ArchCase(spec, payload["variant"], seed=payload["seed"], device="cpu")
    return case, case.candidate(state=payload["state"])


def _ep_task(ctx: Rank, prepared) -> dict:
    import torch.distributed as dist

    from .training import loads

    case, base = prepared
    ep = case.spec.expert_parallel
    p = ctx.payload
    groups = {w: dist.new_group(list(range(w))) for w in p["world_sizes"]}  # every rank creates every group
    results = {}
    for w in p["world_sizes"]:
        if ctx.rank >= w:
            continue
        r, group = ctx.rank, groups[w]
        ctx.stage(f"world size {w}: shard")
        model = copy.deepcopy(base).to(ctx.device).train()
        shard = ep.shard(model, r, w, group)
        state = {k: _detach(v) for k, v in shard.state_dict().items()}
        located = {}  # shard name -> (full name, first row, stop row): None rows = the whole tensor
        for name in state:
            if ep.locate is None:  # the default rule, placed by the parent: same name, contiguous rows
                located[name] = (name, DEFAULT_ROWS, DEFAULT_ROWS)
                continue
            full, rows = ep.locate(shard, name)
            located[name] = (full, None, None) if rows is None else (full, int(rows.start or 0), int(rows.stop))
        res = {"state": state, "located": located, "dispatch": {}}
        for s in SCENARIOS:
            ctx.stage(f"world size {w}: experts on '{s.name}' choices")
            lo, hi = p["scenarios"][s.name]["rows"][w][r]
            res["dispatch"][s.name] = _dispatch(case, shard, p["scenarios"][s.name], lo, hi, ctx.device)
        b0, b1 = p["batch_rows"][w][r]
        batch = {"kwargs": {k: v[b0:b1] for k, v in p["batch"]["kwargs"].items()}, "labels": p["batch"]["labels"][b0:b1]}
        ctx.stage(f"world size {w}: model forward")
        step = _model_step(case, shard, batch, p["n_labels"], ctx.device)
        ctx.stage(f"world size {w}: backward")
        step["loss"].backward()
        if ep.reduce_gradients is not None:
            ctx.stage(f"world size {w}: reduce_gradients")
            ep.reduce_gradients(shard, group)
        res["loss_share"] = float(step["loss"].detach())
        res["logits"] = _detach(step["logits"])
        res["grads"] = {n: _detach(q.grad) for n, q in shard.named_parameters()}
        readings = _readings(step["tap"])
        res["routing"] = readings
        res["experts_out"] = {k: _detach(v) for k, v in step["experts_out"].items()}
        mask = batch["kwargs"]["attention_mask"].to(ctx.device)
        # the team's aux loss and bias update: an error there (raised alike on every rank) fails
        # their own check, not the launch
        if ep.aux_loss is not None and step["tap"].has("logits"):
            ctx.stage(f"world size {w}: aux_loss")
            try:
                res["aux_share"] = float(ep.aux_loss(step["tap"].logits, p["top_k"], mask, group).detach())
            except Exception as exc:  # noqa: BLE001
                res["aux_error"] = f"ExpertParallel.aux_loss raised {type(exc).__name__}: {exc}"
        if ep.bias_update is not None and p["bias_names"]:
            ctx.stage(f"world size {w}: bias_update")
            by_full = {full: name for name, (full, _, _) in located.items()}
            tensors = dict(shard.state_dict(keep_vars=True))
            res["bias"] = {}
            try:
                for reading, full in zip(readings, p["bias_names"]):
                    bias = None if full is None else tensors.get(by_full.get(full, full))
                    if bias is None:
                        continue
                    load = loads(reading["indices"].to(ctx.device), p["num_experts"], mask.reshape(-1).bool())
                    ep.bias_update(bias, load, p["bias_rate"], group)
                    res["bias"][full] = {"after": _detach(bias), "local_load": _detach(load)}
            except Exception as exc:  # noqa: BLE001
                res["bias_error"] = f"ExpertParallel.bias_update raised {type(exc).__name__}: {exc}"
        results[w] = res
        del step, shard, model
    dist.barrier()
    return results


def _single_process(case, payload: dict, hooks) -> dict:
    """The single-process candidate on the whole batch and every scenario's tokens."""
    import torch

    from .training import candidate_disk_names, loads, selection_biases

    cand = case.candidate(state=payload["state"]).train()
    full_state = {k: _detach(v) for k, v in cand.state_dict().items()}
    dispatch = {s.name: _dispatch(case, cand, payload["scenarios"][s.name], 0, DISPATCH_TOKENS, case.device)
                for s in SCENARIOS}
    contributions = {s.name: _slot_contributions(case, cand, payload["scenarios"][s.name]) for s in SCENARIOS}
    step = _model_step(case, cand, payload["batch"], payload["n_labels"], case.device)
    step["loss"].backward()
    readings = _readings(step["tap"])
    mask = payload["batch"]["kwargs"]["attention_mask"]
    out = {"state": full_state, "dispatch": dispatch, "contributions": contributions, "loss": float(step["loss"].detach()),
           "logits": _detach(step["logits"]),
           "grads": {n: _detach(q.grad) if q.grad is not None else torch.zeros_like(q, device="cpu")
                     for n, q in cand.named_parameters()},
           "routing": readings, "experts_out": {k: _detach(v) for k, v in step["experts_out"].items()}}
    if "logits" in case.routing_fields():
        with torch.no_grad():
            out["aux"] = float(hooks.aux_loss(step["tap"].logits, payload["top_k"], mask))
    out["bias"] = {}
    for reading, found in zip(readings, selection_biases(case, cand, "cand")):
        if found is None:
            continue
        name, bias = found
        before = _detach(bias)
        load = loads(reading["indices"], payload["num_experts"], mask.reshape(-1).bool())
        after = before.clone()
        hooks.bias_update(after, load, payload["bias_rate"])
        out["bias"][name] = {"before": before, "after": after, "load": load}
    params = dict(cand.state_dict())
    params.update(dict(cand.named_parameters()))
    out["disk_names"] = candidate_disk_names(case, params)
    return out


def _reference(case, payload: dict) -> dict:
    from .case import logits_of
    from .data import TrainBatch
    from .training import lm_loss, reference_disk_grads, run_model

    ref = case.reference().train()
    batch = TrainBatch(payload["batch"]["kwargs"]["input_ids"], payload["batch"]["kwargs"]["attention_mask"],
                       payload["batch"]["labels"]).to(case.device)
    ref.zero_grad(set_to_none=True)
    logits = logits_of(run_model(ref, batch, True))
    loss = lm_loss(logits, batch.labels)
    loss.backward()
    return {"logits": _detach(logits), "loss": float(loss.detach()),
            "disk_grads": {k: _detach(v) for k, v in reference_disk_grads(case, ref).items()}}


def run_expert_parallel(case, world_sizes: tuple[int, ...] = (2, 4)) -> EPRun:
    """Run the case's expert-parallel shard on max(world_sizes) ranks (each world size w on
    ranks 0..w-1 of its own group), and the same on one process; every figure the
    ``expert_parallel`` suite compares. A failed launch gives an EPRun with ``error`` set."""
    from . import data, tokenizer
    from .routing import top_k
    from .training import hooks_for, selection_biases

    t0 = time.perf_counter()
    ep = case.spec.expert_parallel
    tok = tokenizer.load()
    batch = case.clear_of_ties(lambda a: data.lm_batch(tok, BATCH_SIZE, case.case_seed + 7919 * a).to(case.device))
    state = case.to_candidate(case.disk_state)
    E, K, H = case.num_experts, top_k(case.model_config), case.model_config.hidden_size
    nprocs = max(world_sizes)
    scenarios = {}
    for i, s in enumerate(SCENARIOS):
        drawn = _draw_scenario(s, DISPATCH_TOKENS, H, E, K, case.case_seed * 31 + i)
        drawn["rows"] = {w: row_splits(DISPATCH_TOKENS, w, s.idle_last_rank) for w in world_sizes}
        scenarios[s.name] = drawn
    probe_model = case.candidate(state=state)
    bias_names = [None if f is None else f[0] for f in selection_biases(case, probe_model, "cand")]
    del probe_model
    payload = {
        "source": plugin_source(case.spec), "arch": case.spec.name, "variant": case.variant.name, "seed": case.seed,
        "world_sizes": list(world_sizes), "state": {k: v.cpu() for k, v in state.items()},
        "batch": {"kwargs": {"input_ids": batch.input_ids.cpu(), "attention_mask": batch.attention_mask.cpu()},
                  "labels": batch.labels.cpu()},
        "batch_rows": {w: row_splits(BATCH_SIZE, w) for w in world_sizes},
        "n_labels": int(batch.loss_mask.sum()), "top_k": K, "num_experts": E, "bias_names": bias_names,
        "bias_rate": BIAS_RATE, "scenarios": scenarios,
    }
    device = str(case.device)
    handle = start("moe_conformance.distributed:_ep_task", payload, nprocs, prepare="moe_conformance.distributed:_ep_prepare",
                   backend="nccl" if device.startswith("cuda") else "gloo", device=device, timeout=ep.timeout)
    try:
        single = _single_process(case, payload, hooks_for(case.spec))
        reference = _reference(case, payload)
    except BaseException:
        handle.kill()
        raise
    t_launch = time.perf_counter()
    try:
        per_rank = handle.wait()
    except LaunchFailed as exc:
        return EPRun(tuple(world_sizes), {}, single, reference, payload, error=str(exc), culprits=exc.ranks,
                     seconds=time.perf_counter() - t0, launch_seconds=time.perf_counter() - t_launch)
    ranks = {w: [per_rank[r][w] for r in range(w)] for w in world_sizes}
    return EPRun(tuple(world_sizes), ranks, single, reference, payload, seconds=time.perf_counter() - t0,
                 launch_seconds=time.perf_counter() - t_launch)


if __name__ == "__main__":
    _launcher_main(Path(sys.argv[1]))
