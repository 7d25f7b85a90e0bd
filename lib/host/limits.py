"""How long Odoo lets one request or one cron pass run, from its configuration (a plain dict).

Under the multi-process server (workers > 0) the master kills a worker whose request has run for
`limit_time_real` seconds (SIGKILL: no except, no finally), and the cron worker whose pass has
run for `limit_time_real_cron` (-1: the same as limit_time_real, 0: never). The threaded and the
evented (gevent) servers kill nothing. Work that may run long checks the time left and ends
cleanly before that: a streamed chat ends with finish_reason "length", a cron pass leaves the
rest to the next pass.
"""
import time

from ..datasets.dataset_validator import MAX_FILE_BYTES, MAX_LINE_BYTES

# The worker pings the master's watchdog, then waits up to one beat (4 s) for a connection
# before it reads a request: the request's own clock starts up to that much late.
WATCHDOG_BEAT = 4
SAFETY = 6  # seconds kept to finish the answer (last chunk, usage, [DONE]) and commit


def worker_time_limit(config, cron=False, evented=False):
    """Seconds one request (cron=True: one cron pass) may run before the worker is killed, or
    None when nothing kills it."""
    if evented or not config.get('workers'):
        return None
    limit = config.get('limit_time_real')
    if cron and config.get('limit_time_real_cron') != -1:
        limit = config.get('limit_time_real_cron')
    return limit or None


def deadline(config, started=None, evented=False):
    """The time (time.time()) a request that started at `started` must have answered by, or
    None when it has no limit."""
    limit = worker_time_limit(config, evented=evented)
    if limit is None:
        return None
    return (started or time.time()) + max(limit - WATCHDOG_BEAT - SAFETY, limit / 2.0)


def cron_budget(config, default):
    """Seconds one pass of our cron may take: `default`, or less when the cron worker is killed
    sooner (half its limit: other crons of the database run in the same pass)."""
    limit = worker_time_limit(config, cron=True)
    return default if limit is None else min(default, limit / 2.0)


def dataset_size_limits(config):
    """(max line bytes, max file bytes) a dataset file may have: odoo.conf's
    llm_training_max_line_bytes / llm_training_max_file_bytes, else 1 MB and 512 MB. One rule for
    the dataset's validation and the /v1 upload's body limit."""
    return (int(config.get('llm_training_max_line_bytes') or MAX_LINE_BYTES),
            int(config.get('llm_training_max_file_bytes') or MAX_FILE_BYTES))
