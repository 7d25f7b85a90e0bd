"""Starting our own processes (trainer, model server, token counters) clean of the Odoo worker.

Under Odoo's multi-process server (workers > 0) every worker lowers its own soft limits before
each request: the address space to `limit_memory_hard` (2.5 GB by default) and the CPU time to
what it has used plus `limit_time_cpu` (60 s). A child inherits both: the trainer died allocating
memory ("DefaultCPUAllocator: can't allocate memory"), and would get SIGXCPU after a minute of
CPU. So between fork and exec the child raises those soft limits back to their hard limits and
clears the signal mask it inherited; `close_fds` leaves it only stdio, `restore_signals` resets the
signals Python ignores, and the working folder is always given. A detached child has its own
session (and process group), so a recycled worker, or a signal to the worker's group, never takes
it down. No Odoo import.
"""
import resource
import signal
import subprocess

# The soft limits Odoo's workers lower (odoo/service/server.py, Worker.process_limit).
RAISED_LIMITS = (resource.RLIMIT_AS, resource.RLIMIT_CPU)


def reset_limits():
    """Runs in the child between fork and exec: plain system calls, nothing that takes a lock."""
    for limit in RAISED_LIMITS:
        soft, hard = resource.getrlimit(limit)
        if soft != hard:
            resource.setrlimit(limit, (hard, hard))
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def _child_options(cwd, env, detached):
    return dict(cwd=cwd, env=env, close_fds=True, restore_signals=True, start_new_session=detached,
                preexec_fn=reset_limits)


def spawn(command, cwd, env=None, detached=False, **popen_options):
    """A `subprocess.Popen` of one of our processes; `detached`: in its own session, to outlive
    the worker that starts it."""
    return subprocess.Popen(command, **dict(popen_options, **_child_options(cwd, env, detached)))


def run(command, cwd, env=None, timeout=None, **run_options):
    """A `subprocess.run` of one of our short-lived processes (raises TimeoutExpired)."""
    return subprocess.run(command, timeout=timeout, **dict(run_options, **_child_options(cwd, env, False)))
