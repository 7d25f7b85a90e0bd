"""The job's hyperparameters: form fields plus a JSON object of extras, checked in one place."""
import json

# name -> (type, minimum, maximum); None means unbounded on that side.
KNOWN = {
    'epochs': (int, 0, 100),
    'batch_size': (int, 0, 1024),
    'learning_rate': (float, 0.0, 1.0),
    'learning_rate_multiplier': (float, 0.0, 100.0),
    'dpo_beta': (float, 0.0, 2.0),
    'lora_r': (int, 1, 1024),
    'lora_alpha': (int, 1, 4096),
    'lora_dropout': (float, 0.0, 0.9),
    'max_seq_length': (int, 16, 131072),
    'seed': (int, 0, 2 ** 31 - 1),
    'validation_split': (float, 0.0, 0.5),
    'gradient_accumulation_steps': (int, 1, 1024),
    'warmup_ratio': (float, 0.0, 0.5),
    'weight_decay': (float, 0.0, 1.0),
    'eval_steps': (int, 1, None),
    'logging_steps': (int, 1, None),
    'save_steps': (int, 1, None),
    'max_steps': (int, 0, None),
    'bf16': (bool, None, None),
    'packing': (bool, None, None),
    'merge_adapter': (bool, None, None),
    'target_modules': (list, None, None),
    'lr_scheduler_type': (str, None, None),
}


def parse_hyperparameters(extra_json, base):
    """Merge the JSON extras over `base` (the form fields) and check every value.

    Raises ValueError naming the key and the allowed values, so the form can say what to fix."""
    try:
        extra = json.loads(extra_json or '{}')
    except ValueError as e:
        raise ValueError('hyperparameters are not valid JSON: %s' % e)
    if not isinstance(extra, dict):
        raise ValueError('hyperparameters must be a JSON object, like {"warmup_ratio": 0.1}')
    merged = dict(base)
    merged.update(extra)
    for key, value in merged.items():
        if key not in KNOWN:
            raise ValueError('unknown hyperparameter %r; known: %s' % (key, ', '.join(sorted(KNOWN))))
        kind, low, high = KNOWN[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = merged[key] = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError('hyperparameter %r must be %s, not %r' % (key, kind.__name__, value))
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError('hyperparameter %r is %r; allowed: %s to %s'
                             % (key, value, low, 'any' if high is None else high))
    if 'target_modules' in merged and not all(isinstance(m, str) for m in merged['target_modules']):
        raise ValueError('hyperparameter "target_modules" must be a list of module names')
    return merged
