"""Data-parallel training: one launcher, N worker processes under torchrun, rank 0 reports.

The entry point stays `python -m trainer.train --job-dir DIR` for every caller. With
`num_processes` N > 1 in config.json, that process takes the job folder's lock, then execs itself
(same pid, so whoever recorded it still tracks the launcher; the lock's fd is inherited, so the
folder stays locked) into

    python -m torch.distributed.run --standalone --nproc-per-node N -m trainer.train --job-dir DIR

whose workers (LOCAL_RANK, RANK, WORLD_SIZE set) train with DistributedDataParallel: gloo on CPU,
nccl on CUDA. `batch_size` is the global batch: batch_size // N examples per process; on CPU each
process gets cores // N threads. Rank 0 alone writes the job folder (JobFolder) and measures the
precision, which it broadcasts: every rank must compute alike.

Cancel stops all ranks at the same step end: at each one they all_reduce (MAX) their cancel flags,
and if any is set all of them save the checkpoint (Trainer's collective save) and stop, so no rank
waits forever on another. Where the SIGTERM lands: torchrun starts each worker in a session of
its own, so a SIGTERM to the launcher's process group (Odoo's Cancel) reaches torchrun alone, and
torchrun's answer would be to SIGTERM the workers, SIGKILL them 30 s later and exit failed (a slow
step or a large checkpoint is lost). So the launcher blocks SIGTERM before the exec: torchrun never
acts on it, the signal stays pending there, and every rank reads that pending signal at each step
end (/proc/PID/status, ShdPnd). A SIGTERM sent to a worker itself (Ray signals the whole process
tree) is that worker's flag; workers inherit the blocked mask, so one that arrives while a worker
starts waits for its handler instead of killing it. torchrun exits 0 when its workers do.
"""
import os
import signal
import sys

LAUNCHER_PID = 'TRAINER_LAUNCHER_PID'  # set by the launcher for its workers


def rank():
    return int(os.environ.get('RANK', '0'))


def world_size():
    return int(os.environ.get('WORLD_SIZE', '1'))


def local_rank():
    return int(os.environ.get('LOCAL_RANK', '0'))


def is_worker():
    """Started by torchrun (ours or anyone's): the launcher already holds the folder lock."""
    return 'LOCAL_RANK' in os.environ and 'WORLD_SIZE' in os.environ


def per_process_batch(batch_size, processes):
    """Examples per process and step; refuses a global batch that the processes cannot share evenly
    (uneven shares would weigh examples unequally)."""
    if batch_size % processes:
        raise ValueError('batch_size %d cannot be shared evenly by %d processes (num_processes): use a '
                         'multiple of %d' % (batch_size, processes, processes))
    return batch_size // processes


def threads_per_process():
    """This process's share of the cores: the processes on this machine run side by side."""
    from .precision import available_cores
    return max(1, available_cores() // int(os.environ.get('LOCAL_WORLD_SIZE', '1')))


def block_sigterm():
    """In the launcher, before exec_torchrun: torchrun must not act on SIGTERM (it would kill the
    workers 30 s later and exit failed); pending there, the workers see it (launcher_cancelled)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def exec_torchrun(job_dir, processes, lock, extra_args=()):
    """Replace this process by torchrun running `processes` workers of trainer.train. No return."""
    from .precision import available_cores
    os.set_inheritable(lock.fileno(), True)  # Python opens files close-on-exec; this one must stay
    os.environ[LAUNCHER_PID] = str(os.getpid())
    # Each worker's share of the cores (train() sets it too); set, it keeps torchrun (1) and
    # accelerate (physical cores // N) from choosing their own.
    os.environ.setdefault('OMP_NUM_THREADS', str(max(1, available_cores() // processes)))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                              '--nproc-per-node', str(processes),
                              '--signals-to-handle', 'SIGINT,SIGHUP,SIGQUIT',  # not SIGTERM: blocked
                              '-m', 'trainer.train', '--job-dir', job_dir] + list(extra_args))


def launcher_cancelled():
    """True when a SIGTERM waits, blocked, at our launcher (a Cancel sent to its process group), or
    when the launcher is gone (killed): the folder lock went with it, so the workers stop too."""
    pid = os.environ.get(LAUNCHER_PID)
    if not pid:
        return False
    if os.getppid() != int(pid):  # torchrun starts the workers itself
        return True
    try:
        with open('/proc/%s/status' % pid) as f:
            for line in f:
                if line.startswith('ShdPnd:'):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except (IOError, OSError, ValueError):
        pass
    return False


def init(cuda):
    """The process group, before anything collective (the precision broadcast); transformers'
    TrainingArguments (accelerate's PartialState) then uses this one instead of making its own."""
    import torch
    import torch.distributed as dist
    if world_size() > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group('nccl' if cuda else 'gloo')


def device(cuda):
    import torch
    return torch.device('cuda', local_rank()) if cuda else torch.device('cpu')


def broadcast(value):
    """Rank 0's `value` on every rank (a JSON-like object)."""
    if world_size() == 1:
        return value
    import torch.distributed as dist
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag, on_device):
    """True on every rank when `flag` is true on any."""
    if world_size() == 1:
        return bool(flag)
    import torch
    import torch.distributed as dist
    value = torch.tensor([1 if flag else 0], device=on_device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def finish():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
