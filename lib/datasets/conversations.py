"""Turn conversations (plain-text messages in date order) into chat fine-tuning examples.

No Odoo import: the wizard reads mail.message with the user's rights, converts each body to plain
text and hands the messages here. A message is (conversation key, date, is_assistant, text).

- `split_by_gap` cuts a channel's stream where nobody wrote for `gap_minutes`.
- `build_example` merges consecutive messages of one side into one turn, drops leading assistant
  turns (an example starts with someone asking) and trailing user turns (an example ends with the
  assistant), and puts the system prompt first; it says why a conversation gave no example.
- `build_examples` does that for every conversation and counts the skipped ones per reason.
- `scrub_pii` replaces portal links and access tokens, e-mail addresses, IBANs, card numbers, phone
  numbers and, when given, the names of the conversation's people by placeholders.
"""
import collections
import re

# Where conversations come from (the wizard's and the schedule's `source`).
SOURCES = [('channel', 'Discuss channels'), ('chatter', 'Chatter of a model')]

Message = collections.namedtuple('Message', 'key date is_assistant text')

# Why a conversation gave no example (the preview shows these counts).
SKIP_EMPTY = 'empty'
SKIP_NO_USER = 'no_user'
SKIP_NO_ASSISTANT = 'no_assistant'
SKIP_TOO_SHORT = 'too_short'
SKIP_REASONS = collections.OrderedDict([
    (SKIP_NO_ASSISTANT, 'no assistant reply'),
    (SKIP_TOO_SHORT, 'too short'),
    (SKIP_EMPTY, 'empty after cleaning'),
    (SKIP_NO_USER, 'no user message before the assistant'),
])

Result = collections.namedtuple('Result', 'examples conversations skipped truncated')

# -- personal data ---------------------------------------------------------------------------------
_EMAIL = re.compile(r'[\w.+-]+@[\w-]+(?:\.[\w-]+)+')
# Links that open a record without logging in: Odoo's portal and mail links carry a token in the
# query (access_token, token, hash, signup) or are portal paths (/my/..., /mail/view).
_TOKEN_LINK = re.compile(r'(?:https?://|www\.|/)\S*?(?:[?&;](?:access_token|token|hash|signup_token|auth)=|'
                         r'/my/|/mail/view\b|/web/signup|/web/reset_password)\S*', re.IGNORECASE)
_TOKEN = re.compile(r'\b(access_token|token|signup_token|api_key|hash)(\s*[=:]\s*)[\w.~-]{6,}', re.IGNORECASE)
# IBAN: country, check digits, then 11 to 30 letters/digits, often in groups of four (any case);
# at least 10 digits in all (see _iban), so that ordinary words after a code are left alone.
_IBAN = re.compile(r'\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b', re.IGNORECASE)
IBAN_MIN_DIGITS = 10
# Card: 13 to 19 digits, groups separated by spaces or dashes; confirmed by the Luhn check below so
# that order numbers and the like stay as they are.
_CARD = re.compile(r'(?<![\w+])\d(?:[ -]?\d){12,18}(?!\w)')
# Phone: an optional + or (, then 6 to 15 digits with spaces, dots, dashes or parentheses between
# (short local numbers too: it errs on the side of replacing); dates are left alone (see _phone).
_PHONE = re.compile(r'(?<![\w+])(?:\+|\()?\d(?:[ .\-()]{0,2}\d){5,14}(?!\w)')
NAME_MIN_LENGTH = 3  # parts of a name shorter than this ("Li", "de") are left: too many false hits
_DATE = re.compile(r'^(\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4})$')


def _luhn_ok(digits):
    total = 0
    for i, char in enumerate(reversed(digits)):
        n = int(char)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _iban(match):
    return '[IBAN]' if len(re.sub(r'\D', '', match.group(0))) >= IBAN_MIN_DIGITS else match.group(0)


def _card(match):
    digits = re.sub(r'\D', '', match.group(0))
    return '[CARD]' if _luhn_ok(digits) else match.group(0)


def _phone(match):
    return match.group(0) if _DATE.match(match.group(0)) else '[PHONE]'


def names_pattern(names):
    """A regex matching the given people's names, whole and by part (case-insensitive, whole
    words), longest first so "Jane Doe" goes before "Jane"; None without names."""
    parts = set()
    for name in names or ():
        name = (name or '').strip()
        if len(name) >= NAME_MIN_LENGTH:
            parts.add(name)
        parts.update(p for p in re.split(r'[\s,]+', name) if len(p) >= NAME_MIN_LENGTH)
    if not parts:
        return None
    alternatives = '|'.join(re.escape(p) for p in sorted(parts, key=lambda p: (-len(p), p)))
    return re.compile(r'(?<!\w)(?:%s)(?!\w)' % alternatives, re.IGNORECASE | re.UNICODE)


def scrub_pii(text, names=None):
    """Replace portal links and tokens, e-mail addresses, IBANs, card numbers, phone numbers and
    the given names (a names_pattern) by [LINK], [TOKEN], [EMAIL], [IBAN], [CARD], [PHONE], [NAME].
    The order matters: a link holds e-mails and digits, an IBAN or card number also looks like a
    phone number."""
    text = _TOKEN_LINK.sub('[LINK]', text)
    text = _TOKEN.sub(lambda m: m.group(1) + m.group(2) + '[TOKEN]', text)
    text = _EMAIL.sub('[EMAIL]', text)
    text = _IBAN.sub(_iban, text)
    text = _CARD.sub(_card, text)
    text = _PHONE.sub(_phone, text)
    if names is not None:
        text = names.sub('[NAME]', text)
    return text


# -- conversations ---------------------------------------------------------------------------------
def clean_text(text):
    """Trim each line, and collapse runs of blank lines to one."""
    lines = [line.strip() for line in (text or '').replace('\r\n', '\n').split('\n')]
    return re.sub(r'\n{3,}', '\n\n', '\n'.join(lines)).strip()


def split_by_gap(messages, gap_minutes):
    """Cut messages (in date order, `date` a datetime) into conversations wherever the silence
    between two messages is longer than `gap_minutes`."""
    conversations, current, last = [], [], None
    for message in messages:
        if current and (message.date - last).total_seconds() > gap_minutes * 60:
            conversations.append(current)
            current = []
        current.append(message)
        last = message.date
    if current:
        conversations.append(current)
    return conversations


def group_by_key(messages):
    """One conversation per key (e.g. a chatter record), each in the order given, keys in the order
    of their first message."""
    groups = collections.OrderedDict()
    for message in messages:
        groups.setdefault(message.key, []).append(message)
    return list(groups.values())


def build_example(messages, system_prompt=None, min_turns=2, scrub=True, names=None):
    """(example, None) or (None, skip reason) for one conversation; `names`: a names_pattern
    of the people whose names become [NAME] (with scrub)."""
    turns = []  # [role, [texts]]
    for message in messages:
        text = clean_text(message.text)
        if scrub:
            text = scrub_pii(text, names)
        if not text:
            continue  # an attachment alone, an empty body
        role = 'assistant' if message.is_assistant else 'user'
        if turns and turns[-1][0] == role:
            turns[-1][1].append(text)
        else:
            turns.append([role, [text]])
    if not turns:
        return None, SKIP_EMPTY
    if not any(role == 'assistant' for role, _texts in turns):
        return None, SKIP_NO_ASSISTANT
    while turns and turns[0][0] == 'assistant':
        turns.pop(0)
    if not turns:
        return None, SKIP_NO_USER
    while turns[-1][0] == 'user':
        turns.pop()
        if not turns:
            return None, SKIP_NO_ASSISTANT  # users only after the leading assistant turns
    if len(turns) < max(min_turns or 0, 2):
        return None, SKIP_TOO_SHORT
    chat = [{'role': 'system', 'content': system_prompt.strip()}] if system_prompt and system_prompt.strip() else []
    chat += [{'role': role, 'content': '\n\n'.join(texts)} for role, texts in turns]
    return {'messages': chat}, None


def build_examples(conversations, system_prompt=None, min_turns=2, max_examples=0, scrub=True, names=None):
    """Examples from conversations (each a list of Message in date order), in the order given,
    at most `max_examples` (0: all). Counts skipped conversations per reason."""
    examples, skipped, truncated = [], collections.Counter(), 0
    for messages in conversations:
        example, reason = build_example(messages, system_prompt, min_turns, scrub, names)
        if reason:
            skipped[reason] += 1
        elif max_examples and len(examples) >= max_examples:
            truncated += 1
        else:
            examples.append(example)
    return Result(examples, len(conversations), skipped, truncated)
