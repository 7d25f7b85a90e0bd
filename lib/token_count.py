"""Token counters for dataset validation (plain Python, Odoo's 3.7): count(messages, limit=None)."""
from .dataset_validator import message_text

PIECE_CHARS = 32768  # a piece boundary may split a token: at most one more token a piece
_TOKENIZERS = {}


def tokenizer_counter(tokenizer_json):
    """Count with a model's own tokenizer (its tokenizer.json), plus ChatML's 5 template tokens
    around each message (<|im_start|>role\\n ... <|im_end|>\\n). Long texts are counted in pieces
    and counting stops once past `limit` (the context): a huge example is refused without
    tokenizing all of it."""
    from tokenizers import Tokenizer
    tokenizer = _TOKENIZERS.get(tokenizer_json) or _TOKENIZERS.setdefault(
        tokenizer_json, Tokenizer.from_file(tokenizer_json))

    def count(messages, limit=None):
        total = 5 * len(messages)
        for message in messages:
            text = message_text(message.get('content'))
            for start in range(0, max(len(text), 1), PIECE_CHARS):
                total += len(tokenizer.encode(text[start:start + PIECE_CHARS], add_special_tokens=False).ids)
                if limit and total > limit:
                    return total
        return total
    return count
