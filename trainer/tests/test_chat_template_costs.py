"""The template table Odoo counts with gives apply_chat_template's counts exactly."""
import random

from trainer.chat_template_costs import measure, render_count, table_count


def test_table_matches_the_template_on_random_conversations(tokenizer):
    table = measure(tokenizer)
    assert table['additive'] and table['checked'] > 10
    assert table['prefix'] > 0, "SmolLM2's template adds a default system prompt"
    rng = random.Random(0)
    pieces = ['hello', ' world', '\n', '  ', 'Ünï', '東京', '42', '!?', '\t', 'code()', 'a' * 50]
    for _ in range(40):
        roles = (['system'] if rng.random() < 0.5 else []) + ['user', 'assistant'] * rng.randint(1, 3)
        messages = [{'role': r, 'content': ''.join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))}
                    for r in roles]
        assert table_count(table, tokenizer, messages) == render_count(tokenizer, messages), messages
