"""The warm worker (engine.jobs.warm_worker), with real processes on the CPU: a server's supervisor hands
it a job, which it runs as any worker would; it ends with the server when it has no job, is replaced
when it dies, and none is kept without a GPU unless asked for (BACKPROP_WARM_WORKER)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backprop_mcp.store import JobStore
from backprop_mcp.supervisor import Supervisor
from engine.contract.events import read_events
from engine.contract.spec import DatasetSettings, FinetuneSpec, LoraSettings, TrainSettings
from engine.hardware import gpus
from engine.jobs import processes as procs
from engine.jobs.warm_worker import MAX_EARLY_DEATHS, READY_FILE, WARM_ENV, WarmPool

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "examples" / "data" / "chat.jsonl"


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_the_supervisor_hands_the_next_job_to_the_warm_worker(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(WARM_ENV, "1")  # no GPU here: asked for explicitly
    home = tmp_path / "home"
    supervisor = Supervisor(home, JobStore(home / "jobs.sqlite3"))
    assert supervisor.warm is not None
    supervisor.keep_worker_warm()
    supervisor.warm.wait_ready(timeout_s=300)
    warm = supervisor.warm._warm
    report = json.loads((warm.folder / READY_FILE).read_text())
    assert "torch" in report["imported"] and "transformers" in report["imported"]
    assert report["cuda_initialised"] is False and report["cuda_initialised_by"] is None  # nothing on a GPU
    # nor a device's lock (a job's worker holds its lock file open): the queue is not held up by it
    open_files = [str(fd.readlink()) for fd in Path(f"/proc/{warm.proc.pid}/fd").iterdir()]
    assert open_files and not [f for f in open_files if f.endswith(".lock")], open_files
    spec = FinetuneSpec(
        model=str(tiny_model_dir), lora=LoraSettings(rank=4), dataset=DatasetSettings(path=str(CHAT)),
        train=TrainSettings(steps=2, micro_batch_size=2, max_seq_length=64),
    )  # fmt: skip
    record = supervisor.start_job(spec, label="warm")
    assert record.pid == warm.proc.pid  # the job runs in the process that was warm
    _wait(lambda: supervisor.refresh(supervisor.store.get(record.id)).record.is_terminal, 300, "the job")
    final = supervisor.store.get(record.id)
    assert final.state == "succeeded", final.error
    events, _ = read_events(record.job_dir / "events.jsonl")
    assert events[0].type == "started" and events[0].pid == warm.proc.pid
    assert any(e.type == "log" and "kept warm by the server" in e.message for e in events)
    assert not warm.folder.exists()  # its folder goes when it takes a job
    supervisor.keep_worker_warm()  # the replacement (it waits before importing: REPLACEMENT_DELAY_S)
    replacement = supervisor.warm._warm
    assert replacement is not None and replacement.proc.pid != warm.proc.pid
    supervisor.warm.close()
    assert replacement.proc.returncode == 0 and not replacement.folder.exists()


_SERVER = """
import sys, time
from pathlib import Path
from engine.jobs.warm_worker import WarmPool
pool = WarmPool(Path(sys.argv[1]))
pool.keep_warm()
print(pool._warm.proc.pid, pool._warm.identity.start_time, flush=True)
time.sleep(600)
"""


def test_a_warm_worker_without_a_job_ends_when_its_server_is_killed(tmp_path, monkeypatch):
    monkeypatch.setenv(WARM_ENV, "1")
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(tmp_path / "home")], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        pid, start = server.stdout.readline().split()
        warm = procs.ProcessIdentity(int(pid), float(start))
        assert procs.is_alive(warm)
    finally:
        server.kill()  # SIGKILL: no clean-up in the server
        server.wait()
    _wait(lambda: not procs.is_alive(warm), 300, "the warm worker to end")


def test_a_dead_warm_worker_is_replaced_and_one_that_keeps_dying_is_given_up(tmp_path, monkeypatch):
    monkeypatch.setenv(WARM_ENV, "1")
    pool = WarmPool(tmp_path / "home")
    pool.keep_warm()
    first = pool._warm
    procs.kill_tree(first.identity)
    pool.keep_warm()
    assert pool._warm is not None and pool._warm.proc.pid != first.proc.pid
    assert pool.take(tmp_path) is None  # not ready yet: the job would get a fresh worker
    pool.close()

    # a worker command whose process dies at once
    monkeypatch.setenv(
        "BACKPROP_WORKER_COMMAND", json.dumps([sys.executable, "-c", "raise SystemExit(3)", "run"])
    )
    broken = WarmPool(tmp_path / "home2")
    for _ in range(MAX_EARLY_DEATHS + 2):
        broken.keep_warm()
        if broken._warm is not None:
            broken._warm.proc.wait(timeout=60)
    assert broken._warm is None  # given up after MAX_EARLY_DEATHS


@pytest.mark.parametrize("setting", [None, "0"])
def test_no_warm_worker_without_a_gpu_or_when_turned_off(tmp_path, monkeypatch, setting):
    monkeypatch.setattr(gpus, "probe_gpus", lambda: gpus.GpuProbe(False, reason="no GPU (test)"))
    if setting is None:
        monkeypatch.delenv(WARM_ENV, raising=False)
    else:
        monkeypatch.setenv(WARM_ENV, setting)
    pool = WarmPool(tmp_path / "home")
    pool.keep_warm()
    assert pool._warm is None and not (tmp_path / "home" / "warm").exists()
    assert pool.take(tmp_path) is None


def test_nvml_answers_the_compute_capability_while_the_warm_worker_imports(monkeypatch):
    """bitsandbytes' import asks torch for the cards' compute capability, which makes a CUDA context on a
    GPU; in the warm worker NVML answers instead. No GPU here: NVML is a fake (the probe's own), torch's
    function is the real one, replaced and put back."""
    import torch

    from engine.hardware import gpus
    from engine.jobs.warm_worker import capabilities_from_nvml

    asked = torch.cuda.get_device_capability
    one = [
        gpus.GpuInfo(i, "H100", 81559, 81000, 559, 0, 30, 70.0, 700.0, "9.0", True, None, None)
        for i in (0, 1)
    ]
    monkeypatch.setattr(gpus, "probe_gpus", lambda: gpus.GpuProbe(True, gpus=one))
    with capabilities_from_nvml():
        assert torch.cuda.get_device_capability(torch.cuda.device(1)) == (9, 0)
        assert not torch.cuda.is_initialized()
    assert torch.cuda.get_device_capability is asked
    mixed = [one[0], gpus.GpuInfo(1, "T4", 15360, 15000, 360, 0, 30, 70.0, 70.0, "7.5", False, None, None)]
    monkeypatch.setattr(gpus, "probe_gpus", lambda: gpus.GpuProbe(True, gpus=mixed))
    with capabilities_from_nvml():  # the answer would depend on the card asked about: torch answers
        assert torch.cuda.get_device_capability is asked
    monkeypatch.setattr(gpus, "probe_gpus", lambda: gpus.GpuProbe(False, reason="no driver"))
    with capabilities_from_nvml():
        assert torch.cuda.get_device_capability is asked


_FREEZE_CHECK = """
import gc, sys
from pathlib import Path
from engine.contract.events import EventWriter
from engine.contract.spec import DatasetSettings, FinetuneSpec, JobResult
from engine.jobs import dispatch

def recipe(spec, job_dir, events, cancel_check):
    return JobResult(status="succeeded", kind="finetune", metrics={"frozen": gc.get_freeze_count()})

dispatch._recipe = lambda spec: recipe  # the recipe itself is not what is looked at here
spec = FinetuneSpec(model="tiny", dataset=DatasetSettings(path=sys.argv[1]))
with EventWriter(Path(sys.argv[2]) / "events.jsonl") as events:
    result = dispatch.run_recipe(spec, Path(sys.argv[2]), events, lambda: False, own_process=sys.argv[3] == "1")
print(result.metrics["frozen"])
"""


@pytest.mark.parametrize("own_process", [True, False])
def test_a_job_process_freezes_what_its_imports_made(tmp_path, own_process):
    """A worker (one job, then the process ends) freezes the objects its imports made, so the garbage
    collector's full passes during the job skip them; a caller that lives on (tests, in-process use)
    keeps its collector as it was."""
    out = subprocess.run(
        [sys.executable, "-c", _FREEZE_CHECK, str(CHAT), str(tmp_path), "1" if own_process else "0"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    frozen = int(out.stdout.split()[-1])
    assert frozen > 10_000 if own_process else frozen == 0
