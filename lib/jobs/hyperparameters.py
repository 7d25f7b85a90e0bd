"""The job's settings: one list of canonical names, the names users bring, and their checks.

Plain Python (Odoo's 3.7 and the trainer's 3.11 both read this file). Users bring OpenAI's names
(`n_epochs`, `batch_size`, `learning_rate_multiplier`, value "auto") and Hugging Face's
(`num_train_epochs`, `per_device_train_batch_size`, ...): each is an alias of one canonical
setting. Rules: a setting named in the JSON object is the job's value (the form field is then
updated to show it); two names of one setting with different values are an error; numbers must
be finite and within range; the scheduler must be one transformers knows.
"""
import json
import math

from .trainer_folder import CONFIG_DEFAULTS

# canonical name -> (type, minimum, maximum); None: unbounded on that side.
CANONICAL = {
    'epochs': (int, 0, 100),
    'batch_size': (int, 0, 1024),
    'learning_rate': (float, 0.0, 1.0),
    'learning_rate_multiplier': (float, 0.0, 100.0),
    'dpo_beta': (float, 0.0, 2.0),
    'lora_r': (int, 1, 1024),
    'lora_alpha': (int, 1, 4096),
    'lora_dropout': (float, 0.0, 0.9),
    'target_modules': (list, None, None),
    'max_seq_length': (int, 16, 131072),
    'seed': (int, 0, 2 ** 31 - 1),
    'validation_split': (float, 0.0, 0.5),
    'gradient_accumulation_steps': (int, 1, 1024),
    'warmup_ratio': (float, 0.0, 0.5),
    'warmup_steps': (int, 0, None),
    'weight_decay': (float, 0.0, 1.0),
    'max_grad_norm': (float, 0.0, 1000.0),
    'lr_scheduler_type': (str, None, None),
    'group_by_length': (bool, None, None),
    'logging_steps': (int, 1, None),
    'eval_steps': (int, 1, None),
    'save_steps': (int, 1, None),
    'max_steps': (int, 0, None),
    'bf16': (bool, None, None),
    'packing': (bool, None, None),
    'merge_adapter': (bool, None, None),
    'num_processes': (int, 1, 64),
}

ALIASES = {
    # OpenAI
    'n_epochs': 'epochs',
    'beta': 'dpo_beta',
    # Hugging Face TrainingArguments / TRL
    'num_train_epochs': 'epochs',
    'per_device_train_batch_size': 'batch_size',
    'max_length': 'max_seq_length',
    # peft LoraConfig
    'r': 'lora_r',
    # torchrun
    'nproc_per_node': 'num_processes',
}

# OpenAI's "auto": the provider chooses. Stored as 0 in our fields.
AUTO_SETTINGS = ('epochs', 'batch_size', 'learning_rate_multiplier')

# transformers' SchedulerType values (Odoo's Python cannot import transformers to ask it).
SCHEDULERS = ('linear', 'cosine', 'cosine_with_restarts', 'polynomial', 'constant', 'constant_with_warmup',
              'inverse_sqrt', 'reduce_lr_on_plateau', 'cosine_with_min_lr', 'cosine_warmup_with_min_lr',
              'warmup_stable_decay')

# Settings the job form shows as fields; the others live in the JSON object.
FORM_FIELDS = ('epochs', 'batch_size', 'learning_rate', 'learning_rate_multiplier', 'lora_r', 'lora_alpha',
               'lora_dropout', 'max_seq_length', 'seed', 'validation_split')

# Settings Odoo uses itself and does not pass to the trainer.
ODOO_ONLY = ('learning_rate_multiplier', 'dpo_beta', 'validation_split')

# The local trainer's learning rate when `learning_rate_multiplier` is given instead.
# The local trainer's defaults (trainer/job_files.py): the job's and the job wizard's field
# defaults, and what 0 means in the estimate. One place, the trainer's.
DEFAULTS = CONFIG_DEFAULTS


def canonical_name(name):
    return ALIASES.get(name, name)


def parse_extra(extra_json):
    """The JSON object as {canonical name: checked value}. Raises ValueError saying what to fix."""
    try:
        extra = json.loads(extra_json or '{}')
    except ValueError as e:
        raise ValueError('hyperparameters are not valid JSON: %s' % e)
    if not isinstance(extra, dict):
        raise ValueError('hyperparameters must be a JSON object, like {"warmup_ratio": 0.1}')
    settings, named = {}, {}
    for key, value in extra.items():
        name = canonical_name(key)
        if name not in CANONICAL:
            known = sorted(set(CANONICAL) | set(ALIASES))
            raise ValueError('unknown hyperparameter %r; known: %s' % (key, ', '.join(known)))
        value = check_value(name, value, key)
        if name in settings and settings[name] != value:
            raise ValueError('hyperparameters %r and %r name the same setting (%s) with different values '
                             '(%r, %r); keep one' % (named[name], key, name, settings[name], value))
        settings[name], named[name] = value, key
    return settings


def check_value(name, value, key=None):
    """The value converted to the setting's type, or ValueError naming the key and what is allowed."""
    key = key or name
    kind, low, high = CANONICAL[name]
    if value == 'auto' and name in AUTO_SETTINGS:
        return 0 if kind is int else 0.0
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError('hyperparameter %r must be %s%s, not %r' % (
            key, {int: 'an integer', float: 'a number', bool: 'true or false', list: 'a list',
                  str: 'a string'}[kind], ' or "auto"' if name in AUTO_SETTINGS else '', value))
    if kind is float and not math.isfinite(value):
        raise ValueError('hyperparameter %r must be a finite number, not %r' % (key, value))
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError('hyperparameter %r is %r; allowed: %s to %s' % (key, value, low, 'any' if high is None else high))
    if name == 'lr_scheduler_type' and value not in SCHEDULERS:
        raise ValueError('hyperparameter %r is %r; use one of %s' % (key, value, ', '.join(SCHEDULERS)))
    if name == 'target_modules' and not all(isinstance(m, str) for m in value):
        raise ValueError('hyperparameter %r must be a list of module names' % key)
    return value


def parse_hyperparameters(extra_json, fields):
    """The job's settings as one checked dict: the form `fields`, then the JSON object over them."""
    merged = {name: check_value(name, value) for name, value in fields.items()}
    merged.update(parse_extra(extra_json))
    return merged


def split_form_fields(extra_json):
    """(values for the form fields, the JSON object left for the rest, canonical names): how a
    job stores what the user typed, so each setting has one visible value."""
    settings = parse_extra(extra_json)
    form = {k: v for k, v in settings.items() if k in FORM_FIELDS}
    rest = {k: v for k, v in settings.items() if k not in FORM_FIELDS}
    return form, json.dumps(rest, sort_keys=True) if rest else '{}'


def trainer_config(settings):
    """The local trainer's config from canonical settings: Odoo's own settings out, the
    learning-rate multiplier applied to the trainer's default learning rate."""
    config = {k: v for k, v in settings.items() if k not in ODOO_ONLY}
    if settings.get('learning_rate_multiplier'):
        config['learning_rate'] = DEFAULTS['learning_rate'] * settings['learning_rate_multiplier']
    return config


def check_processes(settings):
    """`batch_size` is the global batch, shared by the processes: refuse one that does not divide."""
    processes = settings.get('num_processes') or 1
    batch = settings.get('batch_size') or DEFAULTS['batch_size']
    if batch % processes:
        raise ValueError('batch_size %d cannot be shared by %d processes (num_processes): use a multiple of %d, '
                         'e.g. %d' % (batch, processes, processes, max(processes, batch - batch % processes)))
