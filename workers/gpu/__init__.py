"""The GPU kit the model workers share: forward passes as CUDA graphs (graphed.py), regional compile
(regional.py) and FP8 linear layers (fp8.py, opt-in). It knows nothing of jobs or queues; the job runtime
(workers/core) never imports it."""
