"""Continued pre-training on plain text: no chat template, the loss on every token; a tiny real
run of SmolLM2 through the trainer's CLI."""
import json
import os

import pytest

from trainer.data import IGNORE_INDEX, PackingCollator, tokenize_file, tokenize_text
from trainer.tests.helpers import read_jsonl, write_job
from trainer.tests.test_train import launch, run


def test_text_is_learned_whole_without_chat_template(tokenizer):
    text = 'Odoo keeps the invoices. The ledger balances at month end.'
    [feature] = tokenize_text(tokenizer, {'text': text}, max_length=128)
    assert feature['labels'] == feature['input_ids'], 'every token is a target'
    assert IGNORE_INDEX not in feature['labels']
    assert feature['input_ids'][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(feature['input_ids'][:-1]) == text  # nothing added around: no template
    assert '<|im_start|>' not in tokenizer.decode(feature['input_ids'])


def test_long_text_is_split_not_cut(tokenizer, tmp_path):
    text = ' '.join('word%d' % i for i in range(200))
    path = tmp_path / 'train.jsonl'
    path.write_text(json.dumps({'text': text}) + '\n' + json.dumps({'text': 'short'}) + '\n')
    features, too_long, empty = tokenize_file(tokenizer, str(path), 64, 'text')
    whole = tokenizer(text)['input_ids'] + [tokenizer.eos_token_id]
    assert [len(f['input_ids']) for f in features[:-1]] == [64] * (len(whole) // 64) + [len(whole) % 64]
    assert sum((f['input_ids'] for f in features[:-1]), []) == whole, 'all of the text is kept, in order'
    assert too_long == [(1, len(whole))] and empty == []
    # packed batches learn every token of each piece but its first (no context to predict it from)
    batch = PackingCollator()(features[-2:])
    n = len(features[-2]['input_ids'])
    assert batch['labels'][0, 1:n].tolist() == features[-2]['input_ids'][1:]


def test_chat_lines_in_a_text_job_are_refused(tokenizer, tmp_path):
    path = tmp_path / 'train.jsonl'
    path.write_text(json.dumps({'messages': [{'role': 'user', 'content': 'hi'}]}) + '\n')
    with pytest.raises(ValueError, match=r'train.jsonl line 1: a text job needs \{"text": ...\}'):
        tokenize_file(tokenizer, str(path), 64, 'text')


def test_text_job_trains_to_completion(tmp_path, model_dir):
    job = write_job(str(tmp_path / 'text'), model_dir, n_train=8, n_valid=0, epochs=1, data_format='text',
                    max_seq_length=64)
    texts = ['The warehouse code for shelf %d is KIWI-%d.' % (i % 4, i % 4) for i in range(8)]
    with open(os.path.join(job, 'train.jsonl'), 'w') as f:
        f.writelines(json.dumps({'text': t}) + '\n' for t in texts)
    status = run(job)
    assert status['state'] == 'completed', status
    assert status['step'] == status['total_steps'] == 2  # 8 texts / batch 4 x 1 epoch
    losses = [m['train_loss'] for m in read_jsonl(os.path.join(job, 'metrics.jsonl')) if 'train_loss' in m]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert os.path.exists(os.path.join(status['result']['model_ref'], 'adapter_config.json'))


def test_unknown_data_format_fails_with_message(tmp_path, model_dir):
    job = write_job(str(tmp_path / 'bad'), model_dir, data_format='preference')
    proc = launch(job)
    assert proc.wait(120) == 1
    from trainer.tests.helpers import read_status
    assert "unknown data_format 'preference'" in read_status(job)['error']
