"""Reading an evaluation: the main metric, the headline, the deploy guard's verdict."""
from .stats import bootstrap_interval, mean

# (key, label, percent?) in the order the report shows them
METRICS = (('exact_match', 'exact match', True), ('token_f1', 'token F1', False), ('rouge_l', 'ROUGE-L', False),
           ('chrf', 'chrF', False), ('length_ratio', 'length ratio', False), ('valid_json', 'valid JSON', True),
           ('loss', 'loss', False), ('perplexity', 'perplexity', False), ('token_accuracy', 'token accuracy', True),
           ('preference_win', 'prefers the chosen answer', True), ('preference_margin', 'preference margin', False))
LOWER_IS_BETTER = ('loss', 'perplexity')
SHORT_ANSWER_WORDS = 5  # references this short (mean words) are judged on exact match
MIN_GUARD_EXAMPLES = 20  # fewer: the guard informs, never warns


def main_metric(setting, data_format, mean_reference_words):
    """The metric the guard and the headline lead with: the setting ('rouge_l', 'exact_match'),
    or for 'auto' exact match on short answers, ROUGE-L otherwise; preference data: the
    chosen-answer rate; plain text: perplexity."""
    if data_format == 'preference':
        return 'preference_win'
    if data_format == 'text':
        return 'perplexity'
    if setting in ('rouge_l', 'exact_match'):
        return setting
    return 'exact_match' if mean_reference_words is not None and mean_reference_words <= SHORT_ANSWER_WORDS \
        else 'rouge_l'


def format_value(key, value):
    if value is None:
        return '-'
    percent = dict((k, p) for k, _label, p in METRICS).get(key)
    return '%d%%' % round(100 * value) if percent else '%.2f' % value


def headline(summary, lead=None):
    """'exact match 12% -> 64%, ROUGE-L 0.31 -> 0.58' (reference -> candidate), lead metric first."""
    reference, candidate = summary.get('reference') or {}, summary.get('candidate') or {}
    if summary.get('data_format') == 'preference':
        keys = ['preference_win', 'preference_margin']
    elif summary.get('data_format') == 'text':
        keys = ['perplexity']
    else:
        keys = ['exact_match', 'rouge_l']
    if lead and lead not in keys:
        keys.insert(0, lead)
    labels = dict((k, label) for k, label, _p in METRICS)
    parts = ['%s %s -> %s' % (labels[k], format_value(k, reference.get(k)), format_value(k, candidate.get(k)))
             for k in keys if reference.get(k) is not None or candidate.get(k) is not None]
    return ', '.join(parts)


def compare(rows, metric, min_examples=MIN_GUARD_EXAMPLES, seed=0):
    """The guard's verdict from per-example (reference score, candidate score) pairs of `metric`:
    {'n', 'difference' (candidate - reference, mean), 'interval' (95% bootstrap), 'verdict'}.
    verdict: 'worse' when the candidate is worse beyond the interval (it excludes 0 on the bad
    side), 'inform' with fewer than `min_examples` (too few to judge: the figures only), 'ok'."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    differences = [sign * (candidate - reference) for reference, candidate in rows
                   if reference is not None and candidate is not None]
    n = len(differences)
    result = {'n': n, 'metric': metric, 'difference': mean(differences),
              'interval': bootstrap_interval(differences, seed=seed)}
    if n < min_examples:
        result['verdict'] = 'inform'
    elif result['interval'] and result['interval'][1] < 0:
        result['verdict'] = 'worse'
    else:
        result['verdict'] = 'ok'
    return result


UNIT_METRICS = ('exact_match', 'token_f1', 'rouge_l', 'chrf', 'valid_json', 'token_accuracy', 'preference_win')


def chart_rows(summary):
    """The chart's bars, one pair a metric both models have a figure for: [(key, label,
    reference value, candidate value, reference width %, candidate width %)]. Metrics on a 0-1
    scale are drawn on it (0.5 is half a bar); the others (loss, perplexity, length ratio, margin)
    against the larger of the two, so the pair compares at a glance whatever the unit."""
    reference, candidate = summary.get('reference') or {}, summary.get('candidate') or {}
    rows = []
    for key, label, _percent in METRICS:
        ref, cand = reference.get(key), candidate.get(key)
        if ref is None or cand is None:
            continue
        scale = 1.0 if key in UNIT_METRICS else (max(abs(ref), abs(cand)) or 1.0)
        rows.append((key, label, ref, cand, round(100.0 * min(abs(ref) / scale, 1.0), 1),
                     round(100.0 * min(abs(cand) / scale, 1.0), 1)))
    return rows
