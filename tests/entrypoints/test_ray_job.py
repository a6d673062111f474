"""examples/ray_job.py submitted as a Ray job to a real local cluster (`ray start --head`), which it
joins and runs tensor-parallel generation on (two CPU ranks); its logged generations must equal
those of the same checkpoint at TP=1 in this process.

The cluster lives in subprocesses with its own ports and temp dir, so it never touches the test
session's own Ray. It is stopped by ending its own processes: `ray stop` would end every Ray
instance on the machine.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import build_tokenized_checkpoint

from llama3_dist import LLM, SamplingParams

pytestmark = [pytest.mark.ray, pytest.mark.subprocess, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command of this interpreter
JOB_ARGS = ["--devices", "cpu,cpu", "--dtype", "float32", "--max-tokens", "8", "--num-prompts", "4"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cluster_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "token"  # ray start clusters use token auth; the token is ~/.ray/auth_token
    env["RAY_enable_worker_prestart"] = "0"  # no idle workers started ahead: CPU is scarce here
    return env


class LocalCluster:
    """`ray start --head` on free ports, in a temp dir of its own; stop() ends exactly its processes."""

    def __init__(self, num_cpus: int = 4):
        self.temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a limit
        (
            self.gcs_port,
            self.dashboard_port,
            client,
            node_manager,
            object_manager,
            agent_http,
            agent_grpc,
            runtime_env,
            metrics,
        ) = _free_ports(9)
        self.env = _cluster_env()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        if not (Path.home() / ".ray" / "auth_token").is_file():
            subprocess.run(
                [*RAY, "get-auth-token", "--generate"], env=self.env, check=True, capture_output=True, timeout=60
            )
        cmd = [
            *RAY,
            "start",
            "--head",
            "--disable-usage-stats",
            f"--num-cpus={num_cpus}",
            "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}",
            f"--temp-dir={self.temp_dir}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={client}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            f"--object-store-memory={200 << 20}",
        ]
        try:
            subprocess.run(cmd, env=self.env, check=True, capture_output=True, text=True, timeout=120)
        except subprocess.CalledProcessError as e:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{e.stdout}\n{e.stderr}") from None
        except BaseException:
            self.stop()
            raise

    def _is_ours(self, cmdline: list[str]) -> bool:
        # Most daemons name the temp dir; the Ray client server names only the GCS address.
        return any(
            self.temp_dir in arg
            or (arg.startswith(("--address=", "--gcs-address=")) and arg.endswith(f":{self.gcs_port}"))
            for arg in cmdline
        )

    def _processes(self) -> list[psutil.Process]:
        """This cluster's daemons and all their descendants."""
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                if self._is_ours(p.info["cmdline"] or []):
                    found[p.pid] = p
                    for child in p.children(recursive=True):
                        found[child.pid] = child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        procs = self._processes()
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=2)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        yield c
    finally:
        c.stop()


def _example_prompts(n: int) -> list[str]:
    spec = importlib.util.spec_from_file_location("ray_job_example", REPO / "examples" / "ray_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [module.PROMPTS[i % len(module.PROMPTS)] for i in range(n)]


def test_ray_job_runs_tensor_parallel_generation(cluster, tmp_path):
    model = build_tokenized_checkpoint(tmp_path / "tiny")
    submission = f"llama3-dist-test-{os.getpid()}-{int(time.time())}"
    cmd = [
        *RAY,
        "job",
        "submit",
        f"--address={cluster.address}",
        f"--submission-id={submission}",
        "--working-dir",
        ".",
        "--",
        "python",
        "examples/ray_job.py",
        "--model",
        model,
        *JOB_ARGS,
    ]
    job = subprocess.Popen(cmd, cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The expected generations: the same checkpoint at TP=1 in this process, while the job runs.
        with LLM(model, dtype="float32", show_progress=False) as llm:
            expected = [
                o.outputs[0].text
                for o in llm.generate(_example_prompts(4), SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
            ]
        logs, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, logs
    assert f"Job '{submission}' succeeded" in logs, logs
    assert "joined a Ray cluster of 1 node(s) with {'CPU': 4.0}" in logs, logs
    result = json.loads(next(line for line in logs.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])
    assert result["devices"] == ["cpu", "cpu"]
    assert result["texts"] == expected
    assert result["tokens_per_s"] > 0
    assert "TP=2 on ['cpu', 'cpu']" in logs
