"""The rank side: one tensor-parallel shard of the transformer (transformer.py, layers.py, rope.py),
its collectives (parallel.py), checkpoint loading (checkpoint.py) and the sampler that runs where
the logits are (sampler.py). Everything here is torch."""
