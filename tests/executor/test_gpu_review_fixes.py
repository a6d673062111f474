"""The multi-GPU defects a review found, each checked as far as a machine without GPUs allows:
GPU numbers on the Ray path, the GPU a Ray rank must find visible, memory given back at close.
(The prefill grid sized from the host: tests/kernels/test_kernels.py.)"""

from __future__ import annotations

import gc
import weakref

import pytest

from llama3_dist import ConfigError, Llama3Config
from llama3_dist.executor import make_executor, ray_worker
from llama3_dist.executor.local import LocalExecutor
from llama3_dist.executor.ray_executor import check_ray_gpu_devices


@pytest.mark.parametrize("devices", [["cuda:1"], ["cuda:2", "cuda:3"], ["cuda:1", "cuda:0"], ["cuda:0", "cuda:0"]])
def test_ray_refuses_gpu_numbers_it_cannot_honour(devices):
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        check_ray_gpu_devices(devices)


def test_ray_accepts_rank_order_and_plain_cuda(checkpoints):
    check_ray_gpu_devices(["cuda:0", "cuda:1"])
    check_ray_gpu_devices(["cuda"] * 3)
    config = Llama3Config.from_pretrained(checkpoints["llama"], devices=["cuda:3", "cuda:5"])
    # refused before Ray is touched or an actor starts
    with pytest.raises(ConfigError, match=r"devices \['cuda:3', 'cuda:5'\]: with Ray"):
        make_executor(config, checkpoints["llama"], "ray", {})


def test_a_rank_whose_gpu_is_not_visible_fails_loudly(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "get_gpu_ids", lambda: ["3"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(RuntimeError, match=r"Ray assigned GPU 3 to this rank, but CUDA_VISIBLE_DEVICES=0,1"):
        ray_worker._assigned_cuda_index()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,3")
    assert ray_worker._assigned_cuda_index() == 1
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert ray_worker._assigned_cuda_index() == 3


def test_close_gives_the_memory_back(checkpoints):
    """close() drops the worker's weights and KV cache (on a GPU it also empties the CUDA
    cache), so a second model in the process, or another engine's rank on the same GPU, gets
    the room: here the cache tensors are gone once the executor is closed."""
    config = Llama3Config.from_pretrained(checkpoints["llama"], devices=["cpu"])
    executor = LocalExecutor(config, checkpoints["llama"], num_kv_blocks=8)
    assert executor.worker is not None
    cache = weakref.ref(executor.worker.kv_caches[0][0])
    weight = weakref.ref(executor.worker.model.embed_tokens.weight)
    executor.close()
    gc.collect()
    assert cache() is None and weight() is None
