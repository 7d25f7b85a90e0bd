"""The evaluation's metrics against values computed by hand on fixed strings, and the masked
token statistics on a stand-in model whose predictions are known: no model is loaded."""
import json
import math

import pytest

from trainer import evaluate
from trainer.data import IGNORE_INDEX


def test_normalise_and_exact_match():
    assert evaluate.normalise('  The Cat,  sat! ') == 'cat sat'
    assert evaluate.exact_match('The answer.', 'answer') == 1.0
    assert evaluate.exact_match('[TICKET-7] Reset it', 'ticket 7 reset it') == 1.0  # punctuation goes
    assert evaluate.exact_match('an answer', 'answers') == 0.0


def test_token_f1():
    # "cat sat on mat" vs "cat is on mat": 3 words in common of 4 and 4 -> P = R = 3/4
    assert evaluate.token_f1('the cat sat on the mat', 'the cat is on the mat') == pytest.approx(0.75)
    # multiplicity: "yes yes yes" vs "yes no": 1 in common, P = 1/3, R = 1/2 -> F1 = 0.4
    assert evaluate.token_f1('yes yes yes', 'yes no') == pytest.approx(0.4)
    assert evaluate.token_f1('', '') == 1.0
    assert evaluate.token_f1('something', '') == 0.0


def test_rouge_l():
    # LCS of the 6 tokens each: the cat . on the mat = 5 -> P = R = F = 5/6
    assert evaluate.rouge_l('the cat sat on the mat', 'the cat is on the mat') == pytest.approx(5 / 6)
    # LCS "a c" of "a b c" (3) and "a c d e" (4): P = 2/3, R = 2/4 -> F = 2PR/(P+R) = 4/7
    assert evaluate.rouge_l('a b c', 'a c d e') == pytest.approx(4 / 7)
    assert evaluate.rouge_l('nothing alike', 'xyz') == 0.0


def test_chrf():
    assert evaluate.chrf('The code word is MANGO.', 'The code word is MANGO.') == pytest.approx(1.0)
    assert evaluate.chrf('qqqq', 'zzzz') == 0.0
    # "ab" vs "abc": character 1-grams P = 2/2, R = 2/3; 2-grams P = 1/1, R = 1/2; no 3- to 6-grams
    # in the answer, so sacrebleu averages over the 2 orders it has (effective order):
    # chrP = 1, chrR = (2/3 + 1/2) / 2 = 7/12, chrF2 = 5 P R / (4 P + R)
    recall = 7 / 12
    assert evaluate.chrf('ab', 'abc') == pytest.approx(5 * recall / (4 + recall), abs=1e-4)


def test_length_ratio_and_json():
    assert evaluate.length_ratio('a b c', 'a b c d e f') == 0.5
    assert evaluate.length_ratio('', 'a b') == 0.0
    assert evaluate.is_json('{"a": 1}') and not evaluate.is_json('{"a": 1')
    assert evaluate.references_are_json(['{"a": 1}', '[1, 2]'])
    assert not evaluate.references_are_json(['{"a": 1}', '42'])
    scores = evaluate.score_answer('{"a": 1}', '{"a": 2}', json_expected=True)
    assert scores['valid_json'] == 1.0 and scores['exact_match'] == 0.0
    assert 'valid_json' not in evaluate.score_answer('x', 'y')


def test_token_statistics():
    figures = evaluate.token_statistics(4 * math.log(2), 4, 3)
    assert figures['loss'] == pytest.approx(math.log(2))
    assert figures['perplexity'] == pytest.approx(2.0)
    assert figures['token_accuracy'] == 0.75
    assert evaluate.token_statistics(0.0, 0, 0) == {'loss': None, 'perplexity': None, 'token_accuracy': None}


def test_split_chat_takes_the_last_assistant_turn():
    example = {'messages': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
                            {'role': 'assistant', 'content': 'Hello'}, {'role': 'user', 'content': 'Code?'},
                            {'role': 'assistant', 'content': 'MANGO'}]}
    prompt, reference = evaluate.split_chat(example)
    assert reference == 'MANGO' and [m['content'] for m in prompt] == ['Be brief.', 'Hi', 'Hello', 'Code?']
    assert evaluate.split_chat({'messages': [{'role': 'user', 'content': 'x'}]}) is None
    # nothing before the answer: nothing to ask (the Odoo side's evaluation reads the same function)
    assert evaluate.split_chat({'messages': [{'role': 'assistant', 'content': 'x'}]}) is None


class UniformModel(object):
    """Every next token equally likely over a vocabulary of 4, except token 2 a little likelier:
    loss ln 4 per target (to a hair), and argmax always 2."""

    def __call__(self, input_ids, attention_mask):
        import torch
        logits = torch.zeros(input_ids.shape + (4,))
        logits[..., 2] = 1e-6
        return type('Output', (), {'logits': logits})()


def test_token_sums_count_only_the_training_targets():
    import torch
    # labels as data.py builds them: the prompt masked; padding of the shorter row too
    features = [{'input_ids': [1, 1, 2, 2], 'labels': [IGNORE_INDEX, IGNORE_INDEX, 2, 3]},
                {'input_ids': [1, 2], 'labels': [IGNORE_INDEX, 2]}]
    sums = evaluate.token_sums(UniformModel(), features, 2, torch)
    (loss_a, tokens_a, right_a), (loss_b, tokens_b, right_b) = sums
    assert (tokens_a, right_a, tokens_b, right_b) == (2, 1, 1, 1)
    assert loss_a == pytest.approx(2 * math.log(4), abs=1e-4) and loss_b == pytest.approx(math.log(4), abs=1e-4)
    figures = evaluate.token_statistics(loss_a + loss_b, tokens_a + tokens_b, right_a + right_b)
    assert figures['perplexity'] == pytest.approx(4.0, abs=1e-3)
    assert figures['token_accuracy'] == pytest.approx(2 / 3)


class LetterTokenizer(object):
    """A chat template in miniature: each message is its role's id, one id per letter (its code
    modulo 8), then an end id; prefixes render consistently, as data.py requires."""
    ROLES = {'system': 4, 'user': 5, 'assistant': 6}

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False, return_dict=False, **kw):
        ids = []
        for message in messages:
            ids += [self.ROLES[message['role']]] + [ord(c) % 8 for c in message['content']] + [7]
        return ids + ([self.ROLES['assistant']] if add_generation_prompt else [])


class FavoursTwo(object):
    """Next token 2 (letters b, j, r, z) is likelier than any other."""

    def __call__(self, input_ids, attention_mask):
        import torch
        logits = torch.zeros(input_ids.shape + (8,))
        logits[..., 2] = 2.0
        return type('Output', (), {'logits': logits})()


def test_preference_win_rate_prefers_the_likelier_answer():
    import contextlib

    import torch
    models = type('Models', (), {'tokenizer': LetterTokenizer(), 'torch': torch,
                                 'use': lambda self, role: (FavoursTwo(), contextlib.nullcontext())})()
    examples = [{'input': {'messages': [{'role': 'user', 'content': 'q'}]},
                 'preferred_output': [{'role': 'assistant', 'content': 'bbb'}],     # token 2: likely
                 'non_preferred_output': [{'role': 'assistant', 'content': 'aaa'}]},  # token 1
                {'input': {'messages': [{'role': 'user', 'content': 'q'}]},
                 'preferred_output': [{'role': 'assistant', 'content': 'aaa'}],
                 'non_preferred_output': [{'role': 'assistant', 'content': 'bbb'}]}]
    progress = type('Progress', (), {'advance': lambda self, units=1: None})()
    rows, summary = evaluate.evaluate_preference(models, examples, {'batch_size': 4}, progress)
    assert [row['candidate']['preference_win'] for row in rows] == [1.0, 0.0]
    # 3 letters differ; each costs log-softmax: ln(e^2 + 7) - 2 for token 2, ln(e^2 + 7) for another
    assert rows[0]['candidate']['preference_margin'] == pytest.approx(3 * 2.0, abs=1e-5)
    assert summary['candidate']['preference_win'] == 0.5 and summary['candidate']['preference_margin'] == 0.0


def test_answers_given_elsewhere_are_scored_without_a_model(tmp_path):
    """The OpenAI evaluation: the service answered for both models; the same metric functions
    score the answers (run as `python -m trainer.evaluate --dir`, torch never imported)."""
    answers = tmp_path / 'answers.jsonl'
    rows = [{'prompt': [{'role': 'user', 'content': 'Q%d' % i}], 'expected': 'the cat sat',
             'reference': 'a dog ran', 'candidate': 'The cat sat.'} for i in range(2)]
    answers.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    (tmp_path / 'config.json').write_text(json.dumps({'answers': str(answers)}))
    assert evaluate.main(['--dir', str(tmp_path)]) == 0
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert (summary['n'], summary['data_format']) == (2, 'chat')
    assert summary['candidate']['exact_match'] == 1.0 and summary['reference']['exact_match'] == 0.0
    assert summary['candidate']['rouge_l'] == 1.0 and 'loss' not in summary['candidate']
    examples = [json.loads(line) for line in (tmp_path / 'examples.jsonl').read_text().splitlines()]
    assert examples[0]['candidate']['answer'] == 'The cat sat.'
    assert examples[0]['reference']['token_f1'] == 0.0
    assert json.loads((tmp_path / 'status.json').read_text())['state'] == 'done'
