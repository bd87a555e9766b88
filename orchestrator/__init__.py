"""Process supervision for the fleet (``python -m orchestrator``), the router, and start-up checks."""
