"""Merge validated datasets into the files a provider trains on, streaming."""
import json
import random

from .dataset_validator import DatasetValidator


def _examples(named_streams, reader_options):
    # Re-parse through the validator: the same rules and conversions as validation (CSV, Parquet,
    # prompt/completion -> chat), and only valid examples pass.
    validator = DatasetValidator(min_examples=0, **reader_options)
    for filename, stream in named_streams:
        for _line, example in validator.add_file(stream, filename):
            yield example


def merge_examples(train_sources, validation_sources, train_path, validation_path,
                   validation_split=0.0, seed=42):
    """Write train.jsonl (and validation.jsonl) from lists of ([(filename, stream), ...], options),
    one per dataset; options are how DatasetValidator reads it (data_format, file_type, columns).
    Examples are written in the shape the trainer reads: {"messages": ...} or {"text": ...}.

    With validation_split, each training example goes to validation with that probability, drawn
    from a generator seeded by `seed`, so the same job always splits the same way.
    Returns {'train': n, 'validation': m}."""
    rng = random.Random(seed)
    counts = {'train': 0, 'validation': 0}
    with open(train_path, 'w', encoding='utf-8') as train, \
            open(validation_path, 'w', encoding='utf-8') as validation:
        for named_streams, options in train_sources:
            for example in _examples(named_streams, options):
                target = 'validation' if validation_split and rng.random() < validation_split else 'train'
                (validation if target == 'validation' else train).write(
                    json.dumps(example, ensure_ascii=False) + '\n')
                counts[target] += 1
        for named_streams, options in validation_sources:
            for example in _examples(named_streams, options):
                validation.write(json.dumps(example, ensure_ascii=False) + '\n')
                counts['validation'] += 1
    return counts
