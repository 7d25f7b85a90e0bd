"""The evaluation hold-out: examples a job keeps out of training to evaluate its model on."""
import json
import os
import random

DEFAULT_FRACTION = 0.1
MAX_EXAMPLES = 200
MIN_EXAMPLES = 5
MIN_TRAINING_LEFT = 10  # below this, the hold-out would starve training: evaluate in-sample


def holdout_size(total, fraction=DEFAULT_FRACTION, maximum=MAX_EXAMPLES, minimum=MIN_EXAMPLES,
                 training_left=MIN_TRAINING_LEFT):
    """How many of `total` examples to hold out: `fraction` of them, at most `maximum`, at least
    `minimum`; 0 when that would leave fewer than `training_left` to train on (or fraction 0)."""
    if not fraction or fraction <= 0:
        return 0
    size = min(maximum, max(minimum, int(round(total * fraction))))
    return size if total - size >= training_left else 0


def split_holdout(train_path, eval_path, fraction=DEFAULT_FRACTION, seed=42):
    """Move a seeded random hold-out of train.jsonl's lines to `eval_path`, rewriting train.jsonl
    without them (streamed twice: the file is never held in memory). Returns the number held out;
    0 leaves train.jsonl as it is and writes no eval file."""
    with open(train_path, 'rb') as f:
        total = sum(1 for line in f if line.strip())
    size = holdout_size(total, fraction)
    if not size:
        return 0
    chosen = set(random.Random(seed).sample(range(total), size))
    kept_path = train_path + '.tmp'
    with open(train_path, 'rb') as source, open(kept_path, 'wb') as kept, open(eval_path, 'wb') as held:
        index = 0
        for line in source:
            if not line.strip():
                continue
            (held if index in chosen else kept).write(line)
            index += 1
    os.replace(kept_path, train_path)
    return size


def count_lines(path):
    if not os.path.exists(path):
        return 0
    with open(path, 'rb') as f:
        return sum(1 for line in f if line.strip())


def first_lines(path, n):
    """The first `n` examples of a JSONL file (for in-sample evaluation)."""
    examples = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            if line.strip():
                examples.append(json.loads(line))
                if len(examples) >= n:
                    break
    return examples
