"""Evaluation by a service's chat API (OpenAI): the prompts and reference answers of the examples,
and the answers both models gave, kept in the evaluation folder one line an example, so a check
that stops half way (a rate limit, a cron pass's end) goes on where it stopped. The trainer's
evaluator then scores the answers (trainer/evaluate.py, `answers` in its config)."""
import json
import os

try:
    from ...trainer.chat_examples import split_chat
except (ImportError, ValueError):  # lib imported as a top-level package (bench/), the addon root on the path
    from trainer.chat_examples import split_chat

ANSWERS = 'answers.jsonl'


def chat_pairs(path, limit):
    """The first `limit` (prompt, reference) pairs of a JSONL file of chat examples."""
    pairs = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            if len(pairs) >= limit:
                break
            pair = split_chat(json.loads(line)) if line.strip() else None
            if pair:
                pairs.append(pair)
    return pairs


def answered(folder):
    """The answers kept so far (complete lines only: a line cut by a crash is dropped and asked again)."""
    path = os.path.join(folder, ANSWERS)
    if not os.path.exists(path):
        return 0
    with open(path, 'rb') as f:
        lines = f.read().split(b'\n')
    complete = lines[:-1]  # the last element follows the last newline: empty, or a cut line
    if lines[-1]:
        with open(path, 'wb') as f:
            f.write(b''.join(line + b'\n' for line in complete))
    return len(complete)


def append(folder, prompt, expected, reference, candidate):
    with open(os.path.join(folder, ANSWERS), 'a', encoding='utf-8') as f:
        f.write(json.dumps({'prompt': prompt, 'expected': expected, 'reference': reference,
                            'candidate': candidate}, ensure_ascii=False) + '\n')


def cost(examples, prompt_tokens, max_new_tokens, reference_prices, candidate_prices):
    """USD at most for `examples` prompts of `prompt_tokens` answered by both models with up to
    `max_new_tokens` each: prices are (input, output) per 1M tokens."""
    total = 0.0
    for input_price, output_price in (reference_prices, candidate_prices):
        total += examples * (prompt_tokens * (input_price or 0.0) + max_new_tokens * (output_price or 0.0)) / 1e6
    return round(total, 4)
