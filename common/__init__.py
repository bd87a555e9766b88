"""The fleet-wide kernel: what every process (workers, router, orchestrator, memory manager) may import.
It imports nothing of the fleet."""
