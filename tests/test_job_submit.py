"""`ray job submit` of the end-to-end job to a `ray start --head` cluster, and its artifacts."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml
from helpers import EXAMPLE_CHECKPOINT, REPO

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(600)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(tmp_path):
    """A separate Ray head (its own ports and temp dir); killed as a process group, never with `ray stop`."""
    import secrets
    import tempfile

    port, dash = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    token = tmp_path / "ray_token"  # Ray's token auth on, with a token of this cluster's own
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
    }
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    proc = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--dashboard-port={dash}",
            "--num-cpus=2",
            "--include-dashboard=true",
            f"--temp-dir={temp}",
            # its own agent ports: the defaults may be taken by another local cluster
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the teardown kills exactly this cluster
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", dash), timeout=1):
                break
        except OSError:
            time.sleep(1)
    assert proc.poll() is None, "ray start --head exited"
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)  # `ray start --block` takes ~30 s to wind down on SIGTERM; nothing here needs that
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    import shutil

    shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_the_distill_job(tmp_path, head, teacher_jsonl):
    address, env = head
    out = tmp_path / "cartridge"
    cfg = {
        "generate": {"checkpoint_dir": str(EXAMPLE_CHECKPOINT), "output_dir": str(tmp_path / "gen")},
        "train": {
            "input_dataset": {"local_path": str(teacher_jsonl), "is_converted": False, "eval_fraction": 0.2},
            "output": {"local_dir": str(out)},
            "kv_cache": {"method": "random", "num_tokens": 8},
            "training": {"global_batch_size": 4, "max_steps": 3, "lr": 1e-2},
        },
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--",
        sys.executable,
        "jobs/distill.py",
        "--config",
        str(tmp_path / "job.yaml"),
        "--skip",
        "generate",
        "--skip",
        "evaluate",
    ]
    for _ in range(12):  # the dashboard answers before its job agent has registered: retry that case only
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
        if "No available agent to submit job" not in r.stdout + r.stderr:
            break
        time.sleep(5)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "succeeded" in (r.stdout + r.stderr)
    # the cluster is closed: a client without its token is refused
    stranger = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    stranger.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token")
    r2 = subprocess.run(
        [cmd[0], "job", "list", "--address", address], env=stranger, capture_output=True, text=True, timeout=120
    )
    assert r2.returncode != 0 and "Authentication" in r2.stdout + r2.stderr
    # the workers' progress lines reach the job's log, each once (Ray Train's print patch used to double them)
    for k in (1, 2, 3):
        assert (r.stdout + r.stderr).count(f"[train] step {k}/3 ") == 1, (r.stdout + r.stderr)[-3000:]
    for name in [
        "adapter_model.safetensors",
        "cartridge.json",
        "cache-final.pt",
        "distillation_config.yaml",
        "README.md",
    ]:
        assert (out / name).is_file(), name
    report = json.loads((out / "distill_report.json").read_text())
    assert report["stages"]["train"]["steps"] == 3 and "generate" not in report["stages"]
