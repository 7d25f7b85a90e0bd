"""Reading chat examples ({"messages": [...]}, OpenAI's fine-tuning format), shared by the trainer's
evaluator (trainer/evaluate.py) and Odoo's side (lib/evaluation/answers.py, which asks a service's
chat API): keep it to the standard library and Python 3.7."""


def split_chat(example):
    """(prompt messages, reference answer) of a chat example: every message before the last
    assistant one, and its text (parts of a list content joined). None when there is nothing to
    ask: no assistant message, or none before it."""
    messages = example.get('messages') or []
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get('role') == 'assistant':
            content = messages[index].get('content')
            if isinstance(content, list):
                content = ''.join(p.get('text') or '' for p in content if isinstance(p, dict))
            prompt = [{'role': m['role'], 'content': m.get('content') or ''} for m in messages[:index]]
            return (prompt, content or '') if prompt else None
    return None
