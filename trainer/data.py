"""Chat examples -> token ids and labels, with the loss on assistant replies only; text examples
({"text": ...}, continued pre-training) -> the text's tokens and an end token, all learned.

Each message's tokens are found by rendering the chat template on growing prefixes of the
conversation, so any template works (ChatML for SmolLM2). For an assistant message, the
template's own header ("<|im_start|>assistant\\n") is masked and the reply plus its end token
are learned, unless the message has weight 0. Labels are built before any padding: pad == eos
for SmolLM2, so masking "pad" tokens afterwards would also mask the real end-of-turn tokens.
"""
import json
import os

IGNORE_INDEX = -100


def _render(tokenizer, messages, add_generation_prompt=False, tools=None):
    kwargs = {'tools': tools} if tools else {}
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=False, **kwargs)
    if isinstance(ids, dict) or hasattr(ids, 'keys'):
        ids = ids['input_ids']
    return list(ids)


def _text_of(message):
    content = message.get('content')
    if isinstance(content, list):  # content parts: keep the text ones
        content = ''.join(part.get('text') or '' for part in content if isinstance(part, dict))
    clean = {'role': message['role'], 'content': content or ''}
    if message.get('tool_calls'):
        clean['tool_calls'] = message['tool_calls']
    if message.get('tool_call_id'):
        clean['tool_call_id'] = message['tool_call_id']
    return clean


def tokenize_example(tokenizer, example):
    """Return {'input_ids': [...], 'labels': [...]} for one chat example."""
    messages = [_text_of(m) for m in example['messages']]
    tools = example.get('tools')
    input_ids, labels = [], []
    for index, message in enumerate(example['messages']):
        full = _render(tokenizer, messages[:index + 1], tools=tools)
        if full[:len(input_ids)] != input_ids:
            raise ValueError('the chat template does not render prefixes consistently')
        segment = full[len(input_ids):]
        learn = message['role'] == 'assistant' and message.get('weight', 1) != 0
        if learn:
            with_header = _render(tokenizer, messages[:index], add_generation_prompt=True, tools=tools) \
                if index else []
            header = max(0, len(with_header) - len(input_ids))
            segment_labels = [IGNORE_INDEX] * header + segment[header:]
        else:
            segment_labels = [IGNORE_INDEX] * len(segment)
        input_ids.extend(segment)
        labels.extend(segment_labels)
    return {'input_ids': input_ids, 'labels': labels}


def tokenize_text(tokenizer, example, max_length):
    """One text example as pieces of at most max_length tokens, every token learned: no chat
    template (the model reads documents, not turns), the tokenizer's own special tokens (a BOS
    where the model uses one) and the end token, so the model learns where a text ends. A long
    text is split, not cut: continued pre-training keeps all of it."""
    ids = list(tokenizer(example['text'], add_special_tokens=True)['input_ids'])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return [{'input_ids': ids[start:start + max_length], 'labels': ids[start:start + max_length]}
            for start in range(0, len(ids), max_length)]


def load_examples(path):
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def tokenize_file(tokenizer, path, max_length, data_format='chat'):
    """Tokenize every example. Returns (features, too_long, nothing_to_learn): examples longer than
    max_length are cut (chat) or split (text) and listed as (line, length); those with no learnable
    token left (weight 0 everywhere, or the reply cut off) are dropped and listed by line. The
    caller reports both."""
    features, too_long, nothing_to_learn = [], [], []
    for line_no, example in enumerate(load_examples(path), 1):
        expected = 'text' if data_format == 'text' else 'messages'
        if not isinstance(example, dict) or expected not in example:
            raise ValueError('%s line %d: a %s job needs {"%s": ...} examples; prepare the job again'
                             % (os.path.basename(path), line_no, data_format, expected))
        if data_format == 'text':
            pieces = tokenize_text(tokenizer, example, max_length)
            if len(pieces) > 1:
                too_long.append((line_no, sum(len(p['input_ids']) for p in pieces)))
            features.extend(pieces)
            continue
        feature = tokenize_example(tokenizer, example)
        if len(feature['input_ids']) > max_length:
            too_long.append((line_no, len(feature['input_ids'])))
            feature = {k: v[:max_length] for k, v in feature.items()}
        if all(label == IGNORE_INDEX for label in feature['labels']):
            nothing_to_learn.append(line_no)
            continue
        features.append(feature)
    return features, too_long, nothing_to_learn


class ChatCollator(object):
    """Pad a batch to its longest sequence: padding gets label -100 and attention 0."""

    def __init__(self, pad_token_id, pad_to_multiple_of=None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, batch):
        import torch
        longest = max(len(item['input_ids']) for item in batch)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids, labels, attention = [], [], []
        for item in batch:
            pad = longest - len(item['input_ids'])
            input_ids.append(item['input_ids'] + [self.pad_token_id] * pad)
            labels.append(item['labels'] + [IGNORE_INDEX] * pad)
            attention.append([1] * len(item['input_ids']) + [0] * pad)
        return {'input_ids': torch.tensor(input_ids), 'labels': torch.tensor(labels),
                'attention_mask': torch.tensor(attention)}


class PackingCollator(object):
    """Padding-free batches: the batch's examples laid end to end in one row, positions restarting
    at 0 for each. With no attention mask, transformers derives a block-diagonal causal mask from
    the positions (masking_utils.find_packed_sequence_indices), so no token attends across
    examples, provided no KV cache is built (transformers skips that detection when one is):
    hence use_cache=False in every batch. (The trainer sets packed_attention.py, which cuts the row by
    its positions and attends per example, with no mask at all.) The first token of each example is not a target: it
    cannot be predicted from the previous example. The loss is the same mean over the same target tokens as a padded batch."""

    def __call__(self, batch):
        import torch
        input_ids, labels, positions = [], [], []
        for item in batch:
            input_ids.extend(item['input_ids'])
            labels.extend([IGNORE_INDEX] + item['labels'][1:])
            positions.extend(range(len(item['input_ids'])))
        return {'input_ids': torch.tensor([input_ids]), 'labels': torch.tensor([labels]),
                'position_ids': torch.tensor([positions]), 'use_cache': False}
