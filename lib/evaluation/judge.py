"""The pairwise judge: a chat model reads one prompt, the reference answer and the two models'
answers, and says which answer is better. Each example is judged twice with the answers swapped
(A/B then B/A), which cancels the judge's preference for a position: the two verdicts must agree
for a win, a disagreement is a tie, and a verdict that cannot be read makes the example invalid
(never guessed). Plain functions: the prompt, the verdict's parsing, the arithmetic."""
import re

SYSTEM = ('You are an impartial judge. You compare two answers to the same request, using the reference '
          'answer as the expected one. Reply with one letter only: A if answer A is better, B if answer B is '
          'better, T if they are equally good.')
VERDICTS = ('A', 'B', 'T')
OUTCOMES = ('candidate', 'reference', 'tie', 'invalid')
# the verdict: the reply's first word once decoration is gone ("**A**", "(B)", "Verdict: T", "Tie.")
_PREFIX = re.compile(r'^(?:verdict|answer|winner|the better answer is|better)\s*[:\-]?\s*', re.IGNORECASE)
_FIRST = re.compile(r'^[\s*"\'`(\[]*([A-Za-z]+)\b')


def judge_messages(prompt, expected, answer_a, answer_b):
    return [{'role': 'system', 'content': SYSTEM},
            {'role': 'user', 'content': 'Request:\n%s\n\nReference answer:\n%s\n\nAnswer A:\n%s\n\nAnswer B:\n%s\n\n'
                                        'Which answer is better? Reply A, B or T.' % (
                                            prompt or '', expected or '', answer_a or '', answer_b or '')}]


def parse_verdict(text):
    """'A', 'B' or 'T' when the reply opens with one (an upper-case letter alone, or the word
    'tie'), after optional decoration and a 'Verdict:'-like prefix; None otherwise. Lower-case
    'a' is the article, not a verdict: "a better answer is B" is not read."""
    text = (text or '').strip()
    for _ in range(2):
        text = _PREFIX.sub('', text.lstrip(' *"\'`([')).strip()
    match = _FIRST.match(text)
    if not match:
        return None
    word = match.group(1)
    if word in VERDICTS:
        return word
    if word.lower() == 'tie':
        return 'T'
    return None


def outcome(first, second):
    """The example's outcome from the verdict with the reference model's answer as A (`first`)
    and the one with the candidate's as A (`second`): 'candidate', 'reference', 'tie' or
    'invalid' (either verdict unreadable)."""
    if first not in VERDICTS or second not in VERDICTS:
        return 'invalid'
    winners = ({'A': 'reference', 'B': 'candidate', 'T': 'tie'}[first],
               {'A': 'candidate', 'B': 'reference', 'T': 'tie'}[second])
    # the same winner both ways round; else a tie (one order saw a tie, or each order preferred
    # the answer in the same position: position bias, not quality)
    return winners[0] if winners[0] == winners[1] else 'tie'


def win_rate(outcomes):
    """{'judged', 'wins', 'losses', 'ties', 'invalid', 'win_rate', 'tie_rate'}: the rates over
    the valid examples (None when none is), the candidate's wins."""
    counts = dict((name, sum(1 for o in outcomes if o == name)) for name in OUTCOMES)
    valid = counts['candidate'] + counts['reference'] + counts['tie']
    return {'judged': len(outcomes), 'wins': counts['candidate'], 'losses': counts['reference'],
            'ties': counts['tie'], 'invalid': counts['invalid'],
            'win_rate': float(counts['candidate']) / valid if valid else None,
            'tie_rate': float(counts['tie']) / valid if valid else None}


def examples_to_judge(count, max_calls):
    """How many examples fit in `max_calls` judge calls (two calls an example)."""
    return max(0, min(count, int(max_calls) // 2))
