"""The driver side: requests, scheduling, KV-cache blocks, step inputs, sampling metadata and
detokenization. Plain Python and numpy, no torch (a test checks it), so the driver process and
its scheduler stay light; the ranks (llama3_dist.model, llama3_dist.executor.worker) hold torch."""
