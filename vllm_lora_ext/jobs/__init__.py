"""Heavy jobs out of the serving process: one spec file and one work folder per job.

A job is a *kind* (``migration``, ``iteris_solve``, ``pool_merge``: :mod:`.kinds`) and its
parameters, written to ``<work>/job.json``. Whoever runs it (:mod:`.runners`: a child process by
default, a thread for comparison, a Ray task) calls :func:`.kinds.execute` on that folder; the job
reads its inputs from files or over HTTP, writes checkpoints and ``result.json`` atomically, and
reports progress in ``progress.json``, which the server reads for its job views and metrics.
Secrets (API keys) never touch the folder: they reach the job in its environment.
"""
