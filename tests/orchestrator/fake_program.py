"""A stand-in for a supervised program: answers /health after a delay, records what happens to it.

    python fake_program.py --name sdxl --port 7859 [--ready-after 0.3] [--exit-at-once 3]
                           [--ignore-term] [--events FILE] [--child] [--orphan]
                           [--unhealthy-when MARKER [--unhealthy-mode 503|hang|not-ready]]

Each event is appended to FILE as one JSON line: {"name", "event", "pid", "t"} with event in
started / ready / sigterm / sigint / cold / exiting. SIGTERM = warm stop: exit after ``--term-delay`` (or
``--warm-seconds``, a long job); a second SIGTERM or SIGINT = cold stop: exit now. ``--ignore-term`` records
SIGTERM and SIGINT but keeps running (so the orchestrator must SIGKILL it); ``--child`` also spawns a
grandchild (sleep) in the same process group, to check that nothing is left behind; ``--orphan`` spawns one in
a session of its own (out of reach of a group kill), which the orchestrator adopts when the program dies.
``--unhealthy-when MARKER``: once the file MARKER exists, the process deletes it (so its replacement starts
healthy), records "unhealthy" and from then on answers /health with 503 (``--unhealthy-mode 503``) or never
answers it (``hang``: the request hangs, as in a wedged server) while the process stays alive; every path
answers alike (``/live`` too), except with ``not-ready``: ``/health`` 503 while ``/live`` stays 200 (a worker
busy reloading its model: not ready, still alive).
Standard library only: it starts in ~50 ms.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ready-after", type=float, default=0.0)
    parser.add_argument("--exit-at-once", type=int, default=None)
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--term-delay", type=float, default=0.0)
    parser.add_argument("--warm-seconds", type=float, default=0.0)
    parser.add_argument("--events", default=os.environ.get("FAKE_EVENTS"))
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--orphan", action="store_true")
    parser.add_argument("--unhealthy-when", default=None)
    parser.add_argument("--unhealthy-mode", choices=("503", "hang", "not-ready"), default="503")
    args = parser.parse_args()

    def record(event: str, **extra) -> None:
        if args.events:
            with open(args.events, "a") as f:
                f.write(json.dumps({"name": args.name, "event": event, "pid": os.getpid(), "t": time.time(),
                                    **extra}) + "\n")

    record("started", env={k: v for k, v in os.environ.items()
                           if k in ("CUDA_VISIBLE_DEVICES", "FLEET_GPU_INDEX", "FLEET_PROGRAM", "MEMORY_MANAGER_URL")})
    print(f"{args.name} starting on port {args.port}", flush=True)
    if args.exit_at_once is not None:
        print(f"{args.name} exits at once", flush=True)
        return args.exit_at_once
    if args.child:
        grandchild = subprocess.Popen(["sleep", "300"])
        record("grandchild", grandchild=grandchild.pid)
    if args.orphan:
        orphan = subprocess.Popen(["sleep", "300"], start_new_session=True)
        record("orphan", orphan=orphan.pid)
    ready_at = time.monotonic() + args.ready_after
    announced = threading.Event()
    sick = threading.Event()
    sick_lock = threading.Lock()

    def unhealthy() -> bool:
        with sick_lock:
            if not sick.is_set() and args.unhealthy_when and os.path.exists(args.unhealthy_when):
                os.unlink(args.unhealthy_when)
                sick.set()
                record("unhealthy", mode=args.unhealthy_mode)
        return sick.is_set()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if unhealthy() and not (args.unhealthy_mode == "not-ready" and self.path == "/live"):
                if args.unhealthy_mode == "hang":
                    threading.Event().wait()  # never answers (a daemon thread: exiting ends it)
                body = json.dumps({"status": "unhealthy", "name": args.name}).encode()
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            ready = time.monotonic() >= ready_at
            if ready and not announced.is_set():
                announced.set()
                record("ready")
            body = json.dumps({"status": "healthy" if ready else "loading", "name": args.name}).encode()
            self.send_response(200 if ready else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True

    terms = []

    def stop_after(seconds: float) -> None:
        def stop():
            time.sleep(seconds)
            server.shutdown()
        threading.Thread(target=stop, daemon=True).start()

    def on_term(signum, frame):
        terms.append(signum)
        record("sigterm")
        if args.ignore_term:
            return
        if len(terms) > 1:
            record("cold")
            stop_after(0)
        else:
            stop_after(args.warm_seconds or args.term_delay)

    def on_int(signum, frame):
        record("sigint")
        if not args.ignore_term:
            record("cold")
            stop_after(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_int)
    server.serve_forever(poll_interval=0.05)
    record("exiting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
