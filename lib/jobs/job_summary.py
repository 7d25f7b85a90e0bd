"""Texts about a finished job: the chatter summary and the readable Log tab (plain functions,
tested alone in tests/test_notifications.py)."""
import math
import re


def format_duration(seconds):
    """'2 h 05 min', '12 min', '45 s'."""
    seconds = int(round(seconds or 0))
    if seconds < 60:
        return '%d s' % seconds
    minutes = seconds // 60
    if minutes < 60:
        return '%d min' % minutes
    return '%d h %02d min' % (minutes // 60, minutes % 60)


def estimated_duration_text(seconds):
    """An estimate in words: 'under a minute' below 60 s (an estimate has no second's precision,
    and float_time's 00:00 read as no time at all), else as format_duration."""
    if seconds < 60:
        return 'under a minute'
    return format_duration(seconds)


# The trainer's final figures (trainer/train.py `final`) -> the fine-tuned model's fields.
MODEL_METRICS = (('train_loss', 'train_loss'), ('valid_loss', 'valid_loss'), ('perplexity', 'perplexity'),
                 ('valid_token_accuracy', 'valid_token_accuracy'),
                 ('tokens_per_second', 'training_tokens_per_second'), ('precision', 'training_precision'))


def model_metric_values(final, train_loss=None, valid_loss=None):
    """The fine-tuned model's metric fields from the trainer's final figures; the job's last
    measured losses fill those the provider did not report (OpenAI reports per-step metrics
    only). Missing figures are False (blank in the form), never 0."""
    final = dict(final or {})
    if final.get('train_loss') is None:
        final['train_loss'] = train_loss
    if final.get('valid_loss') is None:
        final['valid_loss'] = valid_loss
    if final.get('perplexity') is None and final.get('valid_loss') is not None:
        final['perplexity'] = math.exp(min(final['valid_loss'], 50))
    return {field: final[key] if final.get(key) is not None else False for key, field in MODEL_METRICS}


TITLES = {'completed': 'Training completed', 'failed': 'Training failed', 'cancelled': 'Training cancelled'}

# Python's warnings module writes "path.py:LINE: SomethingWarning: text" then the source line,
# indented: library noise (FutureWarning, UserWarning...) the person cannot act on.
_WARNING_LINE = re.compile(r'^\S.*:\d+: \w*Warning: ')
_LEVEL_WIDTH = 7


def summary_lines(state, duration=None, trained_tokens=0, train_loss=None, valid_loss=None, cost=None,
                  compute_seconds=None, result_model=None, error=None):
    """(title, [(label, value)]) of a job that reached `state`. Unmeasured values (None) show
    blank; cost when the provider bills (priced), compute time otherwise."""
    blank = lambda value, fmt='%s': '' if value is None else fmt % value  # noqa: E731
    rows = [('Duration', blank(duration is not None and format_duration(duration) or None)),
            ('Trained tokens', blank(trained_tokens or None, '%d')),
            ('Final train loss', blank(train_loss, '%.4f')),
            ('Final valid loss', blank(valid_loss, '%.4f'))]
    if cost is not None:
        rows.append(('Cost', '%.2f USD' % cost))
    else:
        rows.append(('Compute time', blank(compute_seconds is not None and format_duration(compute_seconds) or None)))
    rows.append(('Result model', result_model or ''))
    if error:
        rows.append(('Reason', error))
    return TITLES[state], rows


def clean_log(text):
    """The trainer's log tail without Python library warnings (the warning line and the source
    line the warnings module prints under it)."""
    kept, skip_source = [], False
    for line in (text or '').splitlines():
        if _WARNING_LINE.match(line):
            skip_source = True
            continue
        if skip_source and line.startswith((' ', '\t')):
            continue
        skip_source = False
        kept.append(line)
    return '\n'.join(kept)


def readable_log(events, log_tail=''):
    """The Log tab: one line per event, oldest first ("time  LEVEL  message"; continuation
    lines of a message indented under it), then the cleaned trainer log tail.

    events: [(time text, level, message)] in any order."""
    lines = []
    for time_text, level, message in sorted(events, key=lambda e: e[0] or ''):
        parts = (message or '').splitlines() or ['']
        lines.append('%s  %s  %s' % (time_text, (level or 'info').upper().ljust(_LEVEL_WIDTH), parts[0]))
        indent = ' ' * (len(time_text or '') + _LEVEL_WIDTH + 4)
        lines.extend(indent + part for part in parts[1:])
    tail = clean_log(log_tail)
    if tail.strip():
        lines += ['', '--- trainer log (last lines) ---', tail]
    return '\n'.join(lines)


LOSS_SERIES = (('train_loss', 'Training loss'), ('valid_loss', 'Validation loss'))


def loss_curve(rows):
    """The Results tab's chart data: one nvd3 series per loss, each with every measured step.

    `rows` are (step, {'train_loss': float or None, 'valid_loss': ...}) in step order; a loss that
    was not measured at a step is None there and leaves no point (never a 0). A loss never
    measured gives no series."""
    series = []
    for field, label in LOSS_SERIES:
        values = [{'x': step, 'y': losses[field]} for step, losses in rows if losses.get(field) is not None]
        if values:
            series.append({'key': label, 'values': values})
    return series
