"""What machine a benchmark ran on: every benchmark prints this line first (CPUs differ: some have
bf16 units, others run bf16 5x to 60x slower). Plain Python, for the Odoo and the trainer venvs."""
import os
import platform

FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile')


def cpu_line():
    """'<model>, <n> cores, flags <the ones of FLAGS it has>'."""
    model, flags = platform.processor() or 'unknown', set()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    model = line.split(':', 1)[1].strip()
                elif line.startswith('flags'):
                    flags = set(line.split(':', 1)[1].split())
                    break
    except (IOError, OSError):
        pass
    wanted = [f for f in FLAGS if f in flags]
    return '%s, %d cores, flags %s' % (model, len(os.sched_getaffinity(0)), ' '.join(wanted) or 'none of ' + '/'.join(FLAGS))
