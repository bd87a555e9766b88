"""The router process (``python -m router``): SDXL and WAN behind the one public port 7860 (router/app.py)."""
