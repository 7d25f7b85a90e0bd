"""What a model's chat template adds around each message, as a table Odoo can count with.

    python -m trainer.chat_template_costs --model DIR            print the table (JSON)
    python -m trainer.chat_template_costs --model DIR --serve    exact counts: one JSON example per
                                                                 stdin line, one count per stdout line

Token counts must be what the trainer sees: the chat template rendered and tokenized, default
system prompt included (SmolLM2's template adds one when the first message is not a system one).
Odoo's Python cannot render these templates (they need Jinja2 >= 3.1; Odoo 11 pins 2.x), but for
templates like ChatML the count is additive: special tokens bound every message, so

    tokens = (prefix if the first role is not system) + sum(frame[role] + tokens(header[role] + content))

and Odoo counts the contents with the same tokenizer.json in Rust. A content is tokenized with
the text the template puts right before it since the last special token (its `header`, e.g.
"user\n"): a content starting with a newline merges with the header's. This module derives
`prefix`, `frame` and `header` from real renders and checks the formula against
apply_chat_template on probe conversations; `additive` is false when any probe disagrees, and
Odoo then asks `--serve` for exact counts instead.
"""
import argparse
import json
import sys

ROLES = ('system', 'user', 'assistant')
PROBE_TEXTS = ('Hello', ' leading space', 'trailing space ', 'two\nlines', '\nstarts with a newline',
               'Ünïcödé – “quotes” 東京', '12345 numbers, and punctuation!?', '  ', 'x' * 300,
               'code: `print(1)`\n\tindented', 'ends with newline\n')


def render_count(tokenizer, messages):
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, 'keys'):
        ids = ids['input_ids']
    return len(ids)


def content_count(tokenizer, text):
    return len(tokenizer.encode(text, add_special_tokens=False))


SENTINEL = 'QZXSENTINELQZX'


def header_of(tokenizer, messages):
    """The text the template renders between the last special token and the last message's content."""
    text = tokenizer.apply_chat_template(messages[:-1] + [dict(messages[-1], content=SENTINEL)], tokenize=False)
    before = text[:text.rindex(SENTINEL)]
    specials = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()}
    end = max([before.rindex(t) + len(t) for t in specials if t and t in before] or [0])
    return before[end:]


def probes():
    """Conversations of every shape the formula must hold for."""
    conversations = []
    for i, text in enumerate(PROBE_TEXTS):
        other = PROBE_TEXTS[(i + 3) % len(PROBE_TEXTS)]
        conversations.append([{'role': 'user', 'content': text}, {'role': 'assistant', 'content': other}])
        conversations.append([{'role': 'system', 'content': other}, {'role': 'user', 'content': text},
                              {'role': 'assistant', 'content': text}, {'role': 'user', 'content': other},
                              {'role': 'assistant', 'content': other}])
    return conversations


def table_count(table, tokenizer, messages):
    total = table['prefix'] if messages[0]['role'] != 'system' else 0
    for message in messages:
        role = message['role']
        total += table['frame'][role] + content_count(tokenizer, table['header'][role] + message['content'])
    return total


def measure(tokenizer):
    """{'additive', 'prefix', 'frame': {role: n}, 'header': {role: text}, 'checked'} for this template."""
    chain = [{'role': 'system', 'content': 'a'}, {'role': 'user', 'content': 'b'}, {'role': 'assistant', 'content': 'c'}]
    frame, header = {}, {}
    for n, message in enumerate(chain):
        # what this message adds to the render, less its header+content tokens
        added = render_count(tokenizer, chain[:n + 1]) - (render_count(tokenizer, chain[:n]) if n else 0)
        header[message['role']] = header_of(tokenizer, chain[:n + 1])
        frame[message['role']] = added - content_count(tokenizer, header[message['role']] + message['content'])
    user_only = [{'role': 'user', 'content': 'b'}]
    prefix = render_count(tokenizer, user_only) - frame['user'] - content_count(tokenizer, header['user'] + 'b')
    table = {'prefix': prefix, 'frame': frame, 'header': header}
    checked = probes()
    additive = all(table_count(table, tokenizer, c) == render_count(tokenizer, c) for c in checked)
    return dict(table, additive=additive, checked=len(checked))


def clean(messages):
    """The messages as the trainer renders them (trainer/data.py: text parts joined)."""
    from .data import _text_of
    return [_text_of(m) for m in messages]


def serve(tokenizer):
    for line in sys.stdin:
        try:
            example = json.loads(line)
            kwargs = {'tools': example['tools']} if example.get('tools') else {}
            ids = tokenizer.apply_chat_template(clean(example['messages']), tokenize=True, return_dict=False, **kwargs)
            count = len(ids['input_ids'] if hasattr(ids, 'keys') else ids)
        except Exception:  # a template that cannot render this example: Odoo estimates it
            count = -1
        sys.stdout.write('%d\n' % count)
        sys.stdout.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True, help='Hugging Face model folder (its tokenizer and template)')
    parser.add_argument('--serve', action='store_true', help='answer exact counts on stdin/stdout')
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.serve:
        return serve(tokenizer)
    print(json.dumps(measure(tokenizer)))


if __name__ == '__main__':
    main()
