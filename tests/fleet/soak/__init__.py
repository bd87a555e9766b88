"""The randomised fault soak (issue 14 §3): the whole fleet under the orchestrator, a seeded stream of jobs and a
seeded schedule of faults, then an invariant checker. ``tests/fleet/test_soak.py`` runs it.

- ``plan``: the run's settings (``SOAK_MINUTES``, ``SOAK_SEED`` …) and the seeded fault schedule.
- ``pods``: one pod = one ``python -m orchestrator`` fleet with its own ``RUNPOD_POD_ID`` and transports.
- ``producer``: the job stream (all three families, both transports, every element form).
- ``injector``: carries out the schedule (signals, outages, the second pod) and records what it did.
- ``invariants``: what must hold once the fleet has settled, with the evidence of each violation.
- ``report``: the table printed at the end (and written next to the fleet logs).
"""
