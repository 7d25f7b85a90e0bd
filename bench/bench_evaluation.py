"""Evaluation throughput: our batched greedy generation (trainer/evaluate.py) vs a cookbook loop.

    python -m bench.bench_evaluation [--examples 32] [--batch-size 8] [--max-new-tokens 32] [--repeats 2]

The same model (SmolLM2-135M-Instruct, fp32), the same prompts, greedy, the same max new tokens:
(1) the cookbook loop, `generate` one example at a time; (2) ours, one left-padded batch per
`--batch-size` prompts sorted by length. Rounds alternate baseline / ours `--repeats` times (this
machine's speed drifts), each timed alone; prints examples/s of both (best round), the ratio, and
the scores of both answer sets against the references (exact match, ROUGE-L, chrF) with how many
answers are identical, so the speed-up is shown to change nothing measured. Goal: >= 3x.
"""
import argparse
import os
import time

MODEL_DIR = os.environ.get('LLMT_BASE_MODEL_DIR', os.path.expanduser('~/.cache/llm_training/models/SmolLM2-135M-Instruct'))
OBJECTS = ('printer', 'laptop', 'phone', 'badge', 'screen', 'keyboard', 'router', 'headset')


def prompts_and_references(n):
    prompts, references = [], []
    for i in range(n):
        thing = OBJECTS[i % len(OBJECTS)]
        prompts.append([{'role': 'system', 'content': 'Support desk.'},
                        {'role': 'user', 'content': 'My %s is broken%s. What should I do?' % (thing, ' again' * (i % 3))}])
        references.append('[T7] Logged: %s repair.' % thing)
    return prompts, references


def scores(answers, references):
    from trainer.evaluate import mean, score_answer
    rows = [score_answer(a, r) for a, r in zip(answers, references)]
    return {name: mean([row[name] for row in rows]) for name in ('exact_match', 'rouge_l', 'chrf')}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--examples', type=int, default=32)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--max-new-tokens', type=int, default=32)
    parser.add_argument('--repeats', type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.machine import cpu_line
    from trainer.evaluate import choose_threads, generate_batched, generate_one_by_one
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    threads = choose_threads(model, torch)  # as the evaluator does; both loops run with them
    print('machine: %s; torch %s, %d threads (measured)' % (cpu_line(), torch.__version__, threads))
    prompts, references = prompts_and_references(args.examples)
    print('%d examples, greedy, at most %d new tokens; ours: batches of %d'
          % (args.examples, args.max_new_tokens, args.batch_size))
    best = {'cookbook': None, 'ours': None}
    answers = {}
    for round_no in range(1, args.repeats + 1):
        for name in ('cookbook', 'ours'):
            started = time.perf_counter()
            if name == 'cookbook':
                answers[name] = generate_one_by_one(model, tokenizer, prompts, args.max_new_tokens, torch)
            else:
                answers[name] = generate_batched(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, torch)
            seconds = time.perf_counter() - started
            rate = args.examples / seconds
            best[name] = max(best[name] or 0.0, rate)
            print('round %d  %-8s %7.2f examples/s (%.1f s)' % (round_no, name, rate, seconds))
    for name in ('cookbook', 'ours'):
        figures = scores(answers[name], references)
        print('%-8s best %7.2f examples/s; exact match %.3f, ROUGE-L %.3f, chrF %.3f'
              % (name, best[name], figures['exact_match'], figures['rouge_l'], figures['chrf']))
    same = sum(a == b for a, b in zip(answers['cookbook'], answers['ours']))
    print('identical answers: %d of %d' % (same, args.examples))
    print('ratio ours / cookbook: %.2fx (goal >= 3x)' % (best['ours'] / best['cookbook']))


if __name__ == '__main__':
    main()
