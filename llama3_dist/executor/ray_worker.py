"""RayWorker: one tensor-parallel rank inside a Ray actor (the rank side of ray_executor.py).

It joins the rendezvous store and the process group (gloo on CPU, NCCL on CUDA), builds a Worker
and runs the steps the driver sends, returning rank 0's output with its tensors in host memory.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import warnings
from typing import Any

import torch

from ..config import Llama3Config
from ..core.step_input import StepInput
from .worker import StepOutput, Worker


class RayWorker:
    """One tensor-parallel rank inside a Ray actor: rendezvous, then a Worker."""

    def __init__(self, rank: int, world_size: int, num_threads: int):
        self.rank, self.world_size = rank, world_size
        self.store: Any = None  # rank 0's torch.distributed.TCPStore, once opened
        self.worker: Worker | None = None
        torch.set_num_threads(num_threads)
        # Compiled-graph inputs arrive as read-only numpy views of the channel buffer; the worker
        # only reads them, so torch's warning about non-writable arrays is noise here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    def ping(self) -> int:
        """Liveness, answered on a thread of its own (the "health" concurrency group the executor
        gives the actor) so that a long step does not hold it up."""
        return os.getpid()

    def node_info(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {
            "node_id": ctx.get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "placement_group_id": ctx.get_placement_group_id(),
        }

    def open_store(self, host: str, timeout_s: float) -> int:
        """Rank 0: the rendezvous store on a port the kernel picks; returns the port."""
        import torch.distributed as dist

        self.store = dist.TCPStore(
            host,
            0,
            world_size=self.world_size,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        return self.store.port

    def init_worker(
        self,
        host: str,
        port: int,
        backend: str,
        local_ip: str,
        timeout_s: float,
        config: Llama3Config,
        checkpoint_path: str,
        worker_kwargs: dict,
    ) -> dict:
        import torch.distributed as dist

        if backend == "gloo":
            # Keep gloo's traffic on the interface that holds the rendezvous (or this node's) address:
            # loopback when every rank shares a node.
            ifname = _interface_of(local_ip)
            if ifname is not None:
                os.environ["GLOO_SOCKET_IFNAME"] = ifname
        device = "cpu"
        if backend == "nccl":
            device = f"cuda:{_assigned_cuda_index()}"
            torch.cuda.set_device(device)
            if "NCCL_SOCKET_IFNAME" not in os.environ:  # bootstrap on the rendezvous interface
                ifname = _interface_of(local_ip)
                if ifname is not None:
                    os.environ["NCCL_SOCKET_IFNAME"] = ifname
        timeout = datetime.timedelta(seconds=timeout_s)
        store = self.store or dist.TCPStore(host, port, world_size=self.world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size, timeout=timeout)
        self.worker = Worker(config, checkpoint_path, rank=self.rank, device=device, **worker_kwargs)
        k_cache = self.worker.kv_caches[0][0]
        return {
            "num_kv_blocks": self.worker.num_kv_blocks,
            "parameter_bytes": self.worker.parameter_bytes(),
            "kv_heads": int(k_cache.shape[2]),
            "kv_cache_bytes": sum(
                k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.worker.kv_caches
            ),
        }

    def check_collective(self) -> float:
        """One all-reduce of a single element across the group (the driver times it out)."""
        import torch.distributed as dist

        assert self.worker is not None
        with self.worker.device_scope():
            probe = torch.ones(1, device=self.worker.device)
            dist.all_reduce(probe)
            return float(probe.item())

    def execute(self, step: StepInput) -> StepOutput | None:
        if self.worker is None:
            raise RuntimeError("execute before init_worker")
        out = self.worker.execute(step)
        if out is None or self.worker.device.type == "cpu":
            return out
        # The driver may have no GPU: bring rank 0's tensors to host memory.
        return dataclasses.replace(
            out,
            **{
                f.name: getattr(out, f.name).cpu()
                for f in dataclasses.fields(out)
                if isinstance(getattr(out, f.name), torch.Tensor)
            },
        )


def _assigned_cuda_index() -> int:
    """This actor's GPU as a torch index: Ray normally narrows CUDA_VISIBLE_DEVICES to the GPU it
    assigned (index 0), unless told not to (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES)."""
    import ray

    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    if not gpu_ids:
        raise RuntimeError("this rank was given no GPU by Ray; CUDA ranks need a {'GPU': 1} bundle")
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        return int(gpu_ids[0])
    if gpu_ids[0] not in visible:
        raise RuntimeError(
            f"Ray assigned GPU {gpu_ids[0]} to this rank, but CUDA_VISIBLE_DEVICES={','.join(visible)} does not "
            f"list it; give the rank its GPU (let Ray set CUDA_VISIBLE_DEVICES, or list every GPU Ray manages)"
        )
    return visible.index(gpu_ids[0])


def _interface_of(ip: str) -> str | None:
    """The name of the network interface holding `ip` (e.g. "lo" for 127.0.0.1), if any."""
    try:
        import psutil
    except ImportError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addrs):
            return name
    return None
