"""Merge validated datasets into the files a provider trains on, streaming."""
import json
import random

from .dataset_validator import DatasetValidator


def _examples(named_streams, data_format):
    # Re-parse through the validator: the same rules as validation, and only valid examples pass.
    validator = DatasetValidator(min_examples=0, data_format=data_format)
    for filename, stream in named_streams:
        for _line, example in validator.add_file(stream, filename):
            yield example


def merge_examples(train_sources, validation_sources, train_path, validation_path,
                   validation_split=0.0, seed=42, data_format='chat'):
    """Write train.jsonl (and validation.jsonl) from lists of [(filename, stream), ...].

    With validation_split, each training example goes to validation with that probability, drawn
    from a generator seeded by `seed`, so the same job always splits the same way.
    Returns {'train': n, 'validation': m}."""
    rng = random.Random(seed)
    counts = {'train': 0, 'validation': 0}
    with open(train_path, 'w', encoding='utf-8') as train, \
            open(validation_path, 'w', encoding='utf-8') as validation:
        for named_streams in train_sources:
            for example in _examples(named_streams, data_format):
                target = 'validation' if validation_split and rng.random() < validation_split else 'train'
                (validation if target == 'validation' else train).write(
                    json.dumps(example, ensure_ascii=False) + '\n')
                counts[target] += 1
        for named_streams in validation_sources:
            for example in _examples(named_streams, data_format):
                validation.write(json.dumps(example, ensure_ascii=False) + '\n')
                counts['validation'] += 1
    return counts
