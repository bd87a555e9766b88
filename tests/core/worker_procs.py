"""Real worker processes for the core tests: an SDXL-queue element in each wire form, and starting a worker."""
import json

from tests.procs import WorkerProcess


def element(job_id, form="string", **config):
    job = {"id": job_id, "type": "sdxl_image_fast", "prompt": "p", "user_id": "user-1", "config": config}
    return {"object": json.dumps(job), "string": json.dumps([json.dumps(job)]), "array": json.dumps([job])}[form]


def start(procs, env, slot=0, tmp_path=None, **kw):
    proc = WorkerProcess(env, slot=slot, log_path=(tmp_path / f"worker{slot}.log") if tmp_path else None, **kw)
    procs.append(proc)
    return proc.wait_healthy()
