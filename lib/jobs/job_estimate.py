"""What the job wizard tells a person before Submit: presets, the estimate and the warnings, as
plain text built from plain numbers (no Odoo import, tested alone in tests/test_job_wizard.py)."""
from ..datasets.dataset_validator import MIN_EXAMPLES  # OpenAI's minimum, which the validator applies
from .hyperparameters import DEFAULTS
from .job_summary import format_duration

# Presets fill epochs, learning rate and LoRA rank (alpha = 2 x rank, the usual peft ratio).
# quick: one pass to check the data and the pipeline; balanced: the trainer's defaults;
# thorough: more passes at a gentler rate with a wider adapter, for larger datasets.
PRESETS = {
    'quick': {'epochs': 1, 'learning_rate': 2e-4, 'lora_r': 8, 'lora_alpha': 16},
    'balanced': {k: DEFAULTS[k] for k in ('epochs', 'learning_rate', 'lora_r', 'lora_alpha')},
    'thorough': {'epochs': 5, 'learning_rate': 1e-4, 'lora_r': 32, 'lora_alpha': 64},
}
PRESET_SELECTION = [
    ('quick', 'Quick: 1 epoch, learning rate 2e-4, LoRA rank 8'),
    ('balanced', 'Balanced: 3 epochs, learning rate 2e-4, LoRA rank 16'),
    ('thorough', 'Thorough: 5 epochs, learning rate 1e-4, LoRA rank 32'),
]


def preset_values(preset, given=None):
    """The preset's settings, less those given explicitly in `given` (a dict of field values)."""
    given = given or {}
    return {k: v for k, v in PRESETS.get(preset, {}).items() if k not in given}


def training_share(examples, tokens, validation_split=0.0):
    """(examples, tokens) a job trains on, once, when `validation_split` of its examples are held
    out for validation (the trainer rounds the held-out count down). One rule for the job's
    estimate and the wizard's."""
    split = validation_split or 0.0
    return examples - int(examples * split), tokens * (1.0 - split)


def estimate_text(examples, tokens, epochs, price=0.0, tokens_per_second=None, complete=True):
    """The estimate shown on the wizard's review step.

    examples, tokens: training examples and tokens (after the validation split), once;
    epochs: the epochs the job will run; price: USD per 1M training tokens (0: not a priced
    provider, so the time is estimated instead, from `tokens_per_second` measured on the
    provider, None when never measured there); complete: False when some datasets are not
    validated yet, whose figures are unknown."""
    trained = int(tokens * epochs)
    lines = [] if complete else ['Counts validated datasets only: validate the others for a full estimate.']
    lines += ['Examples: %d' % examples,
             'Tokens: %d' % int(tokens),
             'Epochs: %d' % epochs,
             'Trained tokens: %d (tokens x epochs)' % trained]
    if price:
        lines.append('Estimated cost: %.2f USD (%d tokens x %s USD per 1M tokens)' % (trained * price / 1e6, trained,
                                                                                        ('%f' % price).rstrip('0').rstrip('.')))
    elif tokens_per_second:
        lines.append('Expected training time: %s (at %.1f tokens/s measured on this provider)'
                     % (format_duration(trained / tokens_per_second), tokens_per_second))
    else:
        lines.append('Expected training time: not measured yet on this provider (known after its first completed '
                     'job with this base model and technique)')
    return '\n'.join(lines)


def warnings_text(examples, datasets, context_length=0, cost=0.0, month_cost=0.0, monthly_budget=0.0):
    """What the person should fix or know before submitting, one line each ('' when nothing).

    examples: training examples, None when unknown (a dataset is not validated yet);
    datasets: [{'name', 'state' ('draft' / 'valid' / 'invalid'), 'token_max'}]; context_length:
    the base model's, 0 when unknown; cost: this job's estimated cost; month_cost: what the
    provider's jobs cost this month already; monthly_budget: the provider's, 0 for none."""
    lines = []
    if examples is not None and examples < MIN_EXAMPLES:
        lines.append('Too few examples: %d; fine-tuning needs at least %d (aim for 50 or more).'
                     % (examples, MIN_EXAMPLES))
    for dataset in datasets:
        if dataset['state'] == 'invalid':
            lines.append('Dataset "%s" is invalid: open it, fix the lines its report names, and validate it again.'
                         % dataset['name'])
        elif dataset['state'] != 'valid':
            lines.append('Dataset "%s" is not validated yet: its figures are unknown until it is (the job validates '
                         'it at Submit and fails on errors).' % dataset['name'])
        elif context_length and dataset.get('token_max', 0) > context_length:
            lines.append('Dataset "%s" has examples of %d tokens, over the base model\'s context of %d: shorten or '
                         'remove them.' % (dataset['name'], dataset['token_max'], context_length))
    if monthly_budget and month_cost + cost > monthly_budget:
        lines.append('Over the provider\'s monthly budget: %.2f USD this month plus %.2f USD for this job is more '
                     'than %.2f USD: Submit will refuse it.' % (month_cost, cost, monthly_budget))
    return '\n'.join(lines)
