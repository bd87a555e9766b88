"""Image encoders the model workers share: the parallel PNG writer (png.py). No GPU, no jobs."""
