"""OpenAI fine-tuning, the parts that need neither Odoo nor the network: status mapping, the
`method` payload, events to metrics, the epochs OpenAI picks for "auto", costs, and keeping the
API key out of every message."""
import re

# OpenAI job status -> the provider status of lib/jobs/job_status.py.
STATUS_MAP = {
    'validating_files': 'queued',
    'queued': 'queued',
    'running': 'running',
    'succeeded': 'succeeded',
    'failed': 'failed',
    'cancelled': 'cancelled',
}
# Statuses OpenAI sends that change nothing on our side (a paused job is still a training job).
HOLDING_STATUSES = ('pausing', 'paused')

# The cookbook's rule for n_epochs="auto": aim at 3 epochs, but at least MIN and at most MAX
# examples seen in all, and 1 to 25 epochs.
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25000
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25

SUFFIX_MAX = 64
_KEY_PATTERN = re.compile(r'\bsk-[A-Za-z0-9_\-*]{3,}')


def provider_status(openai_status, current):
    """(provider status, note). `current` is the status to report when OpenAI's says nothing new:
    paused and unknown statuses keep the job where it is, with a note for its events."""
    if openai_status in STATUS_MAP:
        return STATUS_MAP[openai_status], None
    if openai_status in HOLDING_STATUSES:
        return current, 'OpenAI reports the job as %s.' % openai_status
    return current, 'OpenAI reports an unknown status "%s"; the job keeps its state.' % openai_status


def auto_epochs(n_examples):
    """The epochs OpenAI chooses for n_epochs="auto"."""
    n_examples = max(int(n_examples or 0), 1)
    epochs = TARGET_EPOCHS
    if n_examples * epochs < MIN_TARGET_EXAMPLES:
        epochs = min(MAX_DEFAULT_EPOCHS, MIN_TARGET_EXAMPLES // n_examples)
    elif n_examples * epochs > MAX_TARGET_EXAMPLES:
        epochs = max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return epochs


def method_payload(hyper, method_type='supervised'):
    """The `method` object of a job creation request; 0 in our fields means "auto"."""
    hyperparameters = {
        'n_epochs': hyper.get('epochs') or 'auto',
        'batch_size': hyper.get('batch_size') or 'auto',
        'learning_rate_multiplier': hyper.get('learning_rate_multiplier') or 'auto',
    }
    if method_type == 'dpo' and hyper.get('dpo_beta'):
        hyperparameters['beta'] = hyper['dpo_beta']
    return {'type': method_type, method_type: {'hyperparameters': hyperparameters}}


def metric_from_event(event):
    """Our metrics record from a `metrics` event, or None for other events."""
    data = event.get('data') or {}
    if event.get('type') != 'metrics' or not isinstance(data.get('step'), (int, float)):
        return None
    metric = {'step': int(data['step']), 'train_loss': data.get('train_loss'),
              'valid_loss': data.get('full_valid_loss', data.get('valid_loss')),
              'valid_token_accuracy': data.get('full_valid_mean_token_accuracy',
                                               data.get('valid_mean_token_accuracy'))}
    return {k: v for k, v in metric.items() if v is not None}


def base_of_fine_tuned(model_id):
    """'ft:gpt-4o-mini-2024-07-18:org:suffix:abc123' -> 'gpt-4o-mini-2024-07-18'."""
    parts = (model_id or '').split(':')
    return parts[1] if len(parts) > 2 and parts[0] == 'ft' else None


def redact(text, secret=None):
    """The text with the API key, and anything shaped like one, replaced."""
    text = text or ''
    if secret:
        text = text.replace(secret, '[API key]')
    return _KEY_PATTERN.sub('[API key]', text)
