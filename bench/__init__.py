"""Issue 7 benchmark: our worker code paths (SDXL handler, WAN handler, chat engine) next to plain eager
diffusers/transformers, at full size with random weights (``python -m bench all`` on a GPU) or tiny on the
CPU (``python -m bench all --tiny``). See bench/NOTES.md and bench/RESULTS.md."""
