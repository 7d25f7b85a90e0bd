"""The trainer's environment (Python 3.11, trainer/) as every process we start in it sees it: one
place for where its code is and how it is run, shared by the providers, the model server, the
exporter and the token counters."""
import os
import subprocess

from ..exceptions import TrainingFailedError
from . import processes

ADDON_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # where trainer/ is


def trainer_env():
    """The environment of every trainer-env process."""
    return dict(os.environ, PYTHONPATH=ADDON_ROOT, TOKENIZERS_PARALLELISM='false')


def run_trainer_module(python, args, timeout):
    """Run `python -m trainer.<args>` in the trainer env and return its completed process."""
    try:
        return processes.run([python, '-m'] + args, cwd=ADDON_ROOT, env=trainer_env(), timeout=timeout,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except subprocess.TimeoutExpired:
        raise TrainingFailedError('The trainer environment did not answer within %d s.' % timeout)
    except OSError as e:
        raise TrainingFailedError('Cannot run the trainer Python %s (%s); set llm_training_trainer_python '
                                  'in the Odoo configuration.' % (python, e))
