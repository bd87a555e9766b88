"""Image encoders the model workers share: the parallel PNG writer (png.py) and the WebP thumbnail
(thumbnail.py). No GPU, no jobs."""
