"""The compare wizard's text (a plain function, tested through tests/test_model_lifecycle.py)."""


def compare_text(answers):
    """The compare wizard's result: each model's answer under its name.

    answers: [(model name, answer or None, problem or None)]."""
    blocks = []
    for name, answer, problem in answers:
        body = answer if problem is None else 'No answer: %s' % problem
        blocks.append('=== %s ===\n%s' % (name, body))
    return '\n\n'.join(blocks)
