"""Did the fine-tune help? Score a reference model (the base) and a candidate (the fine-tuned
model) on the same examples, same prompts, greedy.

    python -m trainer.evaluate --dir EVAL_DIR

EVAL_DIR/config.json (written by the Odoo side, lib/evaluation/files.py):
    {"reference": folder, "candidate": folder, "examples": path of a JSONL file (train.jsonl's shape),
     "data_format": "chat" | "preference" | "text", "max_examples": 50, "max_new_tokens": 64,
     "batch_size": 8, "max_length": 1024}
or, for answers a service gave (the OpenAI chat API, lib/providers/openai_fine_tuning.py):
    {"answers": path of a JSONL file of {"prompt", "expected", "reference", "candidate"}}: scored
    with the same functions, no model loaded.
A folder is a model (config.json) or a LoRA adapter (adapter_config.json) on a base. Adapters on the
base that is also loaded share one copy of it: the base pass disables the adapter.

It writes (job_files' atomic status, lines appended):
    status.json     {"state": "running" | "done" | "failed", "progress": 0-100, "error", "pid"}
    examples.jsonl  one line an example: {"prompt": messages, "expected": the reference answer,
                    "reference": {answer, scores}, "candidate": {answer, scores}}
    summary.json    {"n", "data_format", "reference": {metric: mean}, "candidate": {...}}

What is measured (the README's "Evaluation" section says how to read it):
- chat data: loss, perplexity and mean token accuracy on the reference assistant tokens, masked
  exactly as training masks them (trainer/data.py); then each model answers the prompt (every
  message before the last assistant one) greedily, in padded batches, and the answer is scored
  against the reference: exact match (normalised), token F1, ROUGE-L (rouge-score), chrF
  (sacrebleu), length ratio, and valid JSON when the references are JSON;
- preference data: how often the model gives the chosen answer a higher log-likelihood than the
  rejected one (the DPO margin), and the mean margin;
- plain text: loss and perplexity only.
The metric functions are plain and have no model: they are what the tests check on fixed strings.
"""
import argparse
import json
import math
import os
import re
import string
import sys
import time
import traceback

from . import job_files
from .chat_examples import split_chat
from .data import IGNORE_INDEX, load_examples, tokenize_example, tokenize_text

STATUS, CONFIG = job_files.STATUS, job_files.CONFIG
EXAMPLES, SUMMARY = job_files.EVAL_EXAMPLES, job_files.EVAL_SUMMARY
DEFAULTS = {'max_examples': 50, 'max_new_tokens': 64, 'batch_size': 8, 'max_length': 1024, 'data_format': 'chat'}
GENERATION_METRICS = ('exact_match', 'token_f1', 'rouge_l', 'chrf', 'length_ratio')

# -- metrics on strings (no model) -----------------------------------------------------------------
_PUNCTUATION = re.compile('[%s]' % re.escape(string.punctuation))


def normalise(text):
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _PUNCTUATION.sub(' ', (text or '').lower())
    text = re.sub(r'\b(a|an|the)\b', ' ', text)
    return ' '.join(text.split())


def exact_match(prediction, reference):
    return 1.0 if normalise(prediction) == normalise(reference) else 0.0


def token_f1(prediction, reference):
    """F1 of the normalised words in common (counted with multiplicity), SQuAD's."""
    predicted, expected = normalise(prediction).split(), normalise(reference).split()
    if not predicted or not expected:
        return 1.0 if predicted == expected else 0.0
    remaining = {}
    for word in expected:
        remaining[word] = remaining.get(word, 0) + 1
    common = 0
    for word in predicted:
        if remaining.get(word):
            remaining[word] -= 1
            common += 1
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


_ROUGE = []


def rouge_l(prediction, reference):
    """ROUGE-L F-measure (rouge-score, its own tokenizer: lower case, letters and digits)."""
    if not _ROUGE:
        from rouge_score import rouge_scorer
        _ROUGE.append(rouge_scorer.RougeScorer(['rougeL'], use_stemmer=False))
    return _ROUGE[0].score(reference or '', prediction or '')['rougeL'].fmeasure


def chrf(prediction, reference):
    """chrF (sacrebleu's defaults: character 6-grams, beta 2) on a 0-1 scale."""
    from sacrebleu.metrics import CHRF
    return CHRF().sentence_score(prediction or '', [reference or '']).score / 100.0


def length_ratio(prediction, reference):
    """Words of the answer / words of the reference (1.0 is the reference's length)."""
    expected = len((reference or '').split())
    return len((prediction or '').split()) / expected if expected else float(bool((prediction or '').split()))


def is_json(text):
    try:
        json.loads(text)
    except (TypeError, ValueError):
        return False
    return True


def references_are_json(references):
    """JSON references: every one parses to an object or a list (a bare number is not 'JSON')."""
    def structured(text):
        try:
            return isinstance(json.loads(text), (dict, list))
        except (TypeError, ValueError):
            return False
    return bool(references) and all(structured(r) for r in references)


def score_answer(prediction, reference, json_expected=False):
    scores = {'exact_match': exact_match(prediction, reference), 'token_f1': token_f1(prediction, reference),
              'rouge_l': rouge_l(prediction, reference), 'chrf': chrf(prediction, reference),
              'length_ratio': length_ratio(prediction, reference)}
    if json_expected:
        scores['valid_json'] = 1.0 if is_json(prediction) else 0.0
    return scores


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def token_statistics(loss_sum, tokens, correct):
    """Per-token loss, perplexity and token accuracy from sums (None when nothing was measured)."""
    if not tokens:
        return {'loss': None, 'perplexity': None, 'token_accuracy': None}
    loss = loss_sum / tokens
    return {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)), 'token_accuracy': correct / tokens}


# -- examples -> prompts, references, features ------------------------------------------------------
def preference_pair(example):
    """(chosen chat example, rejected chat example) of an OpenAI preference example."""
    prompt = (example.get('input') or {}).get('messages') or []
    return ({'messages': prompt + example['preferred_output'][:1]},
            {'messages': prompt + example['non_preferred_output'][:1]})


# -- models ------------------------------------------------------------------------------------------
def _is_adapter(folder):
    return os.path.isfile(os.path.join(folder, 'adapter_config.json'))


def _adapter_base(folder):
    with open(os.path.join(folder, 'adapter_config.json')) as f:
        return json.load(f)['base_model_name_or_path']


class Models(object):
    """The reference and the candidate, loaded once: adapters on a shared base (the base itself
    is the base with the adapter disabled), other folders as models of their own."""

    def __init__(self, folders):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.torch = torch
        self.roles = {}  # role -> (model, adapter name or None, disable adapters)
        bases = {}

        def base(path):
            path = os.path.realpath(path)
            if path not in bases:
                bases[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            return path

        adapters = {role: folder for role, folder in folders.items() if _is_adapter(folder)}
        for role, folder in folders.items():
            if role not in adapters:
                base(folder)
        for role, folder in adapters.items():
            base(_adapter_base(folder))
        from peft import PeftModel
        peft_models = {}
        for role, folder in sorted(adapters.items()):
            key = os.path.realpath(_adapter_base(folder))
            if key not in peft_models:
                peft_models[key] = PeftModel.from_pretrained(bases[key], folder, adapter_name=role, is_trainable=False)
            else:
                peft_models[key].load_adapter(folder, adapter_name=role, is_trainable=False)
            peft_models[key].eval()
            self.roles[role] = (peft_models[key], role, False)
        for role, folder in folders.items():
            if role in adapters:
                continue
            key = os.path.realpath(folder)
            if key in peft_models:  # the base of a loaded adapter: that model, adapters off
                self.roles[role] = (peft_models[key], None, True)
            else:
                self.roles[role] = (bases[key], None, False)
        tokenizer_folder = folders.get('candidate') if os.path.isfile(
            os.path.join(folders.get('candidate', ''), 'tokenizer_config.json')) else None
        if not tokenizer_folder:
            first = next(iter(folders.values()))
            tokenizer_folder = _adapter_base(first) if _is_adapter(first) else first
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def use(self, role):
        """(model, context manager) to run `role` with: its adapter active, or adapters off."""
        import contextlib
        model, adapter, disable = self.roles[role]
        if adapter:
            model.set_adapter(adapter)
        return model, (model.disable_adapter() if disable else contextlib.nullcontext())


def token_sums(model, features, batch_size, torch):
    """Per example: (sum of the loss over its target tokens, target tokens, tokens predicted
    right), in right-padded batches; the targets are the labels data.py built (as in training)."""
    import torch.nn.functional as F
    results = []
    for start in range(0, len(features), batch_size):
        batch = features[start:start + batch_size]
        longest = max(len(f['input_ids']) for f in batch)
        ids = torch.tensor([f['input_ids'] + [0] * (longest - len(f['input_ids'])) for f in batch])
        labels = torch.tensor([f['labels'] + [IGNORE_INDEX] * (longest - len(f['labels'])) for f in batch])
        attention = torch.tensor([[1] * len(f['input_ids']) + [0] * (longest - len(f['input_ids'])) for f in batch])
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        losses = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction='none') * mask
        correct = (logits.argmax(-1) == targets) & mask
        for row in range(len(batch)):
            results.append((float(losses[row].sum()), int(mask[row].sum()), int(correct[row].sum())))
    return results


def generate_batched(model, tokenizer, prompts, max_new_tokens, batch_size, torch):
    """Greedy answers to chat prompts, one left-padded batch per `batch_size` prompts (sorted by
    length, so a batch pads little), returned in the prompts' order."""
    encoded = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
               for p in prompts]
    encoded = [list(e['input_ids'] if hasattr(e, 'keys') else e) for e in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers = [None] * len(encoded)
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        longest = max(len(encoded[i]) for i in chunk)
        ids = torch.tensor([[pad] * (longest - len(encoded[i])) + encoded[i] for i in chunk])
        attention = torch.tensor([[0] * (longest - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk])
        with torch.inference_mode():
            output = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                    do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
        for row, index in enumerate(chunk):
            answers[index] = tokenizer.decode(output[row][longest:], skip_special_tokens=True).strip()
    return answers


def generate_one_by_one(model, tokenizer, prompts, max_new_tokens, torch):
    """The cookbook loop (bench/bench_evaluation.py's baseline): one `generate` per prompt."""
    answers = []
    for prompt in prompts:
        inputs = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors='pt', return_dict=True)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                    top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(output[0][inputs['input_ids'].shape[1]:], skip_special_tokens=True).strip())
    return answers


def choose_threads(model, torch, cores=None):
    """The thread count that runs this model's small decode-sized forwards fastest now, measured
    as the trainer measures its steps (tuning.py: screened, interleaved, best of rounds, ties to
    fewer threads): on a loaded 2-core machine 2 spinning threads generated 10x slower than one."""
    from . import tuning
    from .distributed import threads_per_process
    options = tuning.thread_options(cores or threads_per_process())
    if len(options) < 2:
        torch.set_num_threads(options[0])
        return options[0]
    ids = torch.full((4, 16), 100, dtype=torch.long)

    def timer(candidate):
        torch.set_num_threads(candidate[1])
        started = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids)
        return time.perf_counter() - started

    candidates = [('fp32', threads) for threads in options]
    kept, _screened = tuning.screen(candidates, timer)
    chosen = tuning.pick(tuning.measure(kept, timer, rounds=2))[1] if len(kept) > 1 else kept[0][1]
    torch.set_num_threads(chosen)
    return chosen


# -- one evaluation -------------------------------------------------------------------------------------
class Progress(object):
    def __init__(self, folder, total):
        self.folder, self.total, self.done = folder, max(total, 1), 0

    def advance(self, units=1):
        self.done += units
        write_status(self.folder, 'running', progress=min(99.0, 100.0 * self.done / self.total))


def write_status(folder, state, **values):
    job_files.write_json_atomic(os.path.join(folder, STATUS), dict(values, state=state, pid=os.getpid(),
                                                                    updated_at=time.time()))


def evaluate_chat(models, examples, config, progress):
    torch = models.torch
    pairs = [split_chat(e) for e in examples]
    kept = [(e, p) for e, p in zip(examples, pairs) if p]
    features = [tokenize_example(models.tokenizer, e) for e, _pair in kept]
    features = [{k: v[:config['max_length']] for k, v in f.items()} for f in features]
    prompts = [p[0] for _e, p in kept]
    references = [p[1] for _e, p in kept]
    json_expected = references_are_json(references)
    rows = [{'prompt': prompts[i], 'expected': references[i]} for i in range(len(kept))]
    summary = {}
    for role in ('reference', 'candidate'):
        model, context = models.use(role)
        with context:
            sums = token_sums(model, features, config['batch_size'], torch)
            progress.advance()
            answers = generate_batched(model, models.tokenizer, prompts, config['max_new_tokens'],
                                       config['batch_size'], torch)
            progress.advance()
        for row, answer, (loss, tokens, correct) in zip(rows, answers, sums):
            row[role] = dict(score_answer(answer, row['expected'], json_expected), answer=answer,
                             **token_statistics(loss, tokens, correct))
        totals = [sum(s[k] for s in sums) for k in range(3)]
        figures = token_statistics(*totals)
        for name in GENERATION_METRICS + (('valid_json',) if json_expected else ()):
            figures[name] = mean([row[role].get(name) for row in rows])
        summary[role] = figures
    return rows, summary


def evaluate_preference(models, examples, config, progress):
    """Chosen vs rejected: the log-likelihood of each answer (its assistant tokens, masked as in
    training); a win when the chosen one is likelier."""
    torch = models.torch
    pairs = [preference_pair(e) for e in examples]
    features = []
    for chosen, rejected in pairs:
        features += [tokenize_example(models.tokenizer, chosen), tokenize_example(models.tokenizer, rejected)]
    rows = [{'prompt': c['messages'][:-1], 'expected': c['messages'][-1]['content'],
             'rejected': r['messages'][-1]['content']} for c, r in pairs]
    summary = {}
    for role in ('reference', 'candidate'):
        model, context = models.use(role)
        with context:
            sums = token_sums(model, features, config['batch_size'], torch)
        progress.advance(2)
        for index, row in enumerate(rows):
            chosen, rejected = sums[2 * index], sums[2 * index + 1]
            margin = rejected[0] - chosen[0]  # sums of -log p: log p(chosen) - log p(rejected)
            row[role] = {'preference_win': 1.0 if margin > 0 else 0.0, 'preference_margin': margin}
        summary[role] = {'preference_win': mean([row[role]['preference_win'] for row in rows]),
                         'preference_margin': mean([row[role]['preference_margin'] for row in rows])}
    return rows, summary


def evaluate_text(models, examples, config, progress):
    torch = models.torch
    features = []
    for example in examples:
        features += tokenize_text(models.tokenizer, example, config['max_length'])
    rows, summary = [], {}
    for role in ('reference', 'candidate'):
        model, context = models.use(role)
        with context:
            sums = token_sums(model, features, config['batch_size'], torch)
        progress.advance(2)
        summary[role] = token_statistics(*[sum(s[k] for s in sums) for k in range(3)])
    return rows, summary


EVALUATORS = {'chat': evaluate_chat, 'preference': evaluate_preference, 'text': evaluate_text}


def score_answered(answered):
    """Rows and summary of answers given elsewhere (a service's chat API answered for both
    models): [{'prompt', 'expected', 'reference': answer, 'candidate': answer}] scored as
    evaluate_chat scores generated answers; no loss, the service does not give it."""
    json_expected = references_are_json([a['expected'] for a in answered])
    rows = [{'prompt': a['prompt'], 'expected': a['expected']} for a in answered]
    summary = {}
    for role in ('reference', 'candidate'):
        for row, given in zip(rows, answered):
            row[role] = dict(score_answer(given[role], row['expected'], json_expected), answer=given[role])
        summary[role] = dict((name, mean([row[role].get(name) for row in rows]))
                             for name in GENERATION_METRICS + (('valid_json',) if json_expected else ()))
    return rows, summary


def write_results(folder, rows, summary):
    with open(os.path.join(folder, EXAMPLES + '.tmp'), 'w') as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + '\n')
    os.replace(os.path.join(folder, EXAMPLES + '.tmp'), os.path.join(folder, EXAMPLES))
    job_files.write_json_atomic(os.path.join(folder, SUMMARY), summary)
    write_status(folder, 'done', progress=100.0)


def run(folder):
    with open(os.path.join(folder, CONFIG)) as f:
        config = dict(DEFAULTS, **json.load(f))
    write_status(folder, 'running', progress=0.0)
    if config.get('answers'):  # answered already (the OpenAI chat API): scores only, no model
        with open(config['answers'], encoding='utf-8') as f:
            answered = [json.loads(line) for line in f if line.strip()]
        if not answered:
            raise RuntimeError('no answer to score in %s' % config['answers'])
        rows, summary = score_answered(answered)
        return write_results(folder, rows, dict(summary, n=len(rows), data_format='chat'))
    if not os.path.exists(config['examples']):  # checked before torch loads: a failure says so at once
        raise RuntimeError('the examples file %s is missing' % config['examples'])
    examples = load_examples(config['examples'])[:config['max_examples']]
    if not examples:
        raise RuntimeError('no example to evaluate in %s' % config['examples'])
    import torch
    torch.manual_seed(0)
    models = Models({'reference': config['reference'], 'candidate': config['candidate']})
    threads = choose_threads(models.roles['reference'][0], torch)
    progress = Progress(folder, 4)
    progress.advance(0)
    rows, summary = EVALUATORS[config['data_format']](models, examples, config, progress)
    write_results(folder, rows, dict(summary, n=len(rows) or len(examples), data_format=config['data_format'],
                                     threads=threads))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--dir', required=True, help='the evaluation folder (config.json in it)')
    args = parser.parse_args(argv)
    try:
        run(args.dir)
    except Exception as e:  # the Odoo side reads the reason from status.json
        traceback.print_exc()
        write_status(args.dir, 'failed', error='%s: %s' % (type(e).__name__, e))
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
