"""The GPU kit the model workers share: forward passes as CUDA graphs (graphed.py) and regional compile
(regional.py). It knows nothing of jobs or queues; the job runtime (workers/core) never imports it."""
