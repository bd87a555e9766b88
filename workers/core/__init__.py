"""The job runtime every model worker runs: queue → job → handler → storage → callback.

Start reading at ``service.py`` (one worker process: wiring, HTTP, stop), then ``runner.py`` (the job loop,
a recipe), ``queue.py`` (the reliable queue and its Lua steps) and ``callbacks.py`` (the job-callback client
and outbox). ``job.py`` and ``params.py`` decode the app's elements; ``keys.py`` is the table of Redis keys.
A model kind plugs in through ``handler.py``; this package never imports a model kind.
"""
