"""The process environment and engine arguments of vLLM engines run by this project, the lifeline that ends
them with their owner, and the watcher that cleans up after an engine run in its owner's own process.

vLLM runs its engine core (and, on CPU, its worker) as child processes of the process that built the engine.
Ray SIGKILLs an actor's process group when the actor ends, which leaks vLLM's shared memory.
:func:`exit_with_parent` is registered as a vLLM general plugin (``vllm.general_plugins`` in pyproject.toml),
which vLLM loads in every process it starts: where ``LIFELINE_ENV`` is set, each of vLLM's child processes
leaves its parent's process group, watches its parent and, once the parent is gone, shuts itself down through
vLLM's own SIGTERM handler. This module imports nothing heavy: it runs in every vLLM process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

LIFELINE_ENV = "RAY_CARTRIDGES_EXIT_WITH_PARENT"
_POLL_S = 1.0
_GRACE_S = 30.0  # after SIGTERM, time for vLLM's own shutdown before the process is killed


def cpu_engine_env() -> dict[str, str]:
    """Env of a vLLM CPU engine (see ENVIRONMENT notes); values already set by the user win."""
    n = os.cpu_count() or 1
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        # vllm-cpu saves its AOT-compiled model but cannot load it back and compiles again at every start;
        # without AOT its torch.compile cache is read back on later starts
        "VLLM_USE_AOT_COMPILE": "0",
    }
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if iomp.is_file():
        env["LD_PRELOAD"] = str(iomp)
    return {k: os.environ.get(k, v) for k, v in env.items()}


def engine_actor_env(use_gpu: bool, in_process: bool = False) -> dict[str, str]:
    """``runtime_env["env_vars"]`` of a Ray actor that owns a vLLM engine. ``in_process``: vLLM's engine core and
    worker run in the actor's own process (on CPU with the threads its worker process would bind): the engine
    starts without two more processes importing vLLM, and which requests share a step never depends on timing.
    Values the user set in the driver's environment win."""
    env = {} if use_gpu else cpu_engine_env()
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not use_gpu:  # Ray gives a 1-CPU actor one OpenMP thread; vLLM's CPU worker binds every core
            env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    # Ray SIGKILLs an actor's children at exit by default, leaking vLLM's shared memory; the lifeline ends them
    env["RAY_kill_child_processes_on_worker_exit"] = "0"
    env[LIFELINE_ENV] = "1"
    return env


def set_engine_env(cpu: bool) -> None:
    """The env of a vLLM engine built in this process (values the user set win)."""
    for k, v in (cpu_engine_env() if cpu else {}).items():
        os.environ.setdefault(k, v)
    os.environ[LIFELINE_ENV] = "1"
    if cpu and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        _start_openmp_reaper()


_reaper_started = False


def _start_openmp_reaper() -> None:
    """An engine in this process has no vLLM child to clean up after it: Ray SIGKILLs an actor, so the OpenMP
    runtime's file of this process is removed by a watcher of its own session (out of reach of the group kill)."""
    global _reaper_started
    if _reaper_started or not Path("/dev/shm").is_dir():
        return
    import subprocess

    # this module alone (it imports nothing heavy), found where this process found it
    code = f"from ray_cartridges.engine_env import _reap_after; _reap_after({os.getpid()})"
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # no OpenMP runtime (and file) of its own
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", code]
    subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, env=env)  # fmt: skip
    _reaper_started = True


def vllm_engine_args(
    model_path: str,
    *,
    dtype: str = "fp32",
    max_model_len: int = 4096,
    seed: int = 0,
    enforce_eager: bool = False,
    block_size: int | None = None,
    max_num_seqs: int | None = None,
    **extra,
) -> dict:
    """Arguments of every vLLM engine this project builds (teacher and cartridge engines): prefix caching on,
    ``None`` meaning vLLM's own choice, and on CPU this process's engine env set and prompts never split.
    ``extra``: any other vLLM engine argument (kv_transfer_config, tensor_parallel_size, ...)."""
    from vllm.platforms import current_platform

    kw = dict(
        model=model_path,
        tokenizer=model_path,
        dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype],
        max_model_len=max_model_len,
        enable_prefix_caching=True,
        seed=seed,
        enforce_eager=enforce_eager,
        **extra,
    )
    kw |= {k: v for k, v in (("block_size", block_size), ("max_num_seqs", max_num_seqs)) if v is not None}
    cpu = current_platform.is_cpu()
    set_engine_env(cpu=cpu)
    if cpu:
        # vLLM CPU cannot rewind a per-request torch.Generator ("CPU Generator does not use offset") when a
        # prompt's prefill is split over steps; per-request seeds keep sampling independent of batching
        # (resume-safe), so prompts are never split
        kw |= {"enable_chunked_prefill": False, "max_num_batched_tokens": max(4096, max_model_len)}
    return kw


def _remove_stale_openmp_files(exiting: bool = False) -> None:
    """Remove the Intel OpenMP runtime's registration files (one per process in /dev/shm) of processes that are
    gone, and this process's own when ``exiting``: the runtime removes its file in a C exit handler, which a
    killed process and one ending through ``os._exit`` (multiprocessing's children) never run."""
    for f in Path("/dev/shm").glob("__KMP_REGISTERED_LIB_*_*"):
        pid = f.name.split("_")[-2]
        if pid.isdigit() and (not Path(f"/proc/{pid}").exists() or (exiting and int(pid) == os.getpid())):
            f.unlink(missing_ok=True)


def _reap_after(pid: int) -> None:
    """The watcher's body: wait for ``pid`` to end, then remove the OpenMP files of processes that are gone."""
    while Path(f"/proc/{pid}").exists():
        time.sleep(_POLL_S / 2)
    _remove_stale_openmp_files()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_POLL_S)
    _remove_stale_openmp_files()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(_GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)


def exit_with_parent() -> None:
    """vLLM plugin hook: where ``LIFELINE_ENV`` is set, this process stops when its parent does."""
    import multiprocessing

    # only in vLLM's own children: the process that built the engine (a Ray actor, a user's script) is left be
    if os.environ.get(LIFELINE_ENV) != "1" or multiprocessing.parent_process() is None:
        return
    from multiprocessing.util import Finalize

    # out of the actor's process group, which Ray SIGKILLs when the actor ends: this process then shuts
    # down through vLLM (freeing its shared memory) once it sees its parent gone
    try:
        os.setpgid(0, 0)
    except OSError:
        pass

    # vLLM's children end through multiprocessing (os._exit): its finalizers run there, atexit hooks do not
    Finalize(None, _remove_stale_openmp_files, kwargs={"exiting": True}, exitpriority=0)
    threading.Thread(target=_watch, args=(os.getppid(),), name="ray-cartridges-lifeline", daemon=True).start()
