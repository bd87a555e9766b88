"""The VRAM memory manager (``python -m memory_manager``, port 7870): ledger, probe, policy, HTTP app, client."""
