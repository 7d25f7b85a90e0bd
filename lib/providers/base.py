"""The contract between the engine and a training service.

An adapter is a plain class: it gets a `JobSpec` (what one attempt of a job is) and returns plain
dicts, and never sees the ORM, so it can be read, tested and reused alone. The engine
(models/llm_training_engine.py) is its only caller: it builds the spec from the job, calls the
adapter, and writes back what the adapter reports, the events it noted and the provider data it
changed in `spec.provider_data`. Errors are those of lib/exceptions.py.

`check` returns a report, a dict with these keys (all optional but `status`):
    status          one of lib/jobs/job_status.PROVIDER_STATUSES ('lost': the service no longer knows the run)
    progress        0-100
    step, total_steps, epoch, eta (unix seconds), trained_tokens
    started_at      unix seconds: when the run started training there (else: when a check first saw it run)
    error           text, when status is failed
    events          [{'id', 'created_at' (unix), 'level', 'message', 'data'}]  (ids make them idempotent)
    metrics         [{'step', 'epoch', 'train_loss', 'valid_loss', 'valid_token_accuracy',
                      'learning_rate', 'tokens_per_second'}]
    result          {'name', 'model_ref', 'description', 'metrics'} when succeeded: the model to register;
                    metrics: the trainer's final figures (train_loss, valid_loss, perplexity,
                    valid_token_accuracy, tokens_per_second, precision), any may be missing
    tokens_per_second, precision   the speed reached, for later jobs' estimates
    log             the tail of the provider's log
"""
from ..exceptions import TrainingFailedError
from ..jobs.hyperparameters import DEFAULTS

CAPABILITIES = ('can_resume', 'can_pause', 'supports_dpo', 'supports_text', 'registers_checkpoints', 'uses_api_key',
                'lists_models', 'tests_connection', 'can_chat', 'bills_training', 'serves_on_cluster',
                'evaluates', 'exports', 'local_embeddings', 'openai_embeddings')
# 'evaluates_on_request' (not a provider field of its own): the adapter evaluates when the provider's
# Evaluate with chat setting is on (paid chat calls), and `evaluates` then reads True.
# The options `chat` and `chat_stream` take (OpenAI's names); None or absent means the default.
# max_seconds: the answer ends (finish_reason "length") that long after the request, e.g. before
# an Odoo worker's time limit kills the request; adapters that cannot stop by time ignore it.
CHAT_OPTIONS = ('max_tokens', 'temperature', 'top_p', 'stop', 'seed', 'max_seconds', 'n')


class JobSpec(object):
    """One attempt of a job, as a provider sees it.

    job_key           stable for the attempt: a repeated start sends the same one (idempotence)
    attempt           1, 2, ...: a resume is a new attempt
    database, job_id, name
    base_model        the base model's technical id (model_ref); base_model_name for messages
    technique         lora / qlora / full
    hyperparameters   canonical names (lib/jobs/hyperparameters.py)
    data_format       chat / preference / text (continued pre-training: {"text"} examples)
    work_dir          the job folder: train.jsonl (+ validation.jsonl) prepared there
    validation_examples, seed, suffix
    state             the job's state (queued / training)
    external_id       the provider's id of the run, once started
    resume            start from the folder's last checkpoint
    provider_data     the adapter's own memory across calls (JSON-able); changes are kept
    events            what the adapter noted during a call ({'message', 'level'}), recorded by the engine
    """
    __slots__ = ('job_key', 'attempt', 'database', 'job_id', 'name', 'base_model', 'base_model_name', 'technique',
                 'hyperparameters', 'data_format', 'work_dir', 'validation_examples', 'seed', 'suffix', 'state',
                 'external_id', 'resume', 'provider_data', 'events')

    def __init__(self, **values):
        unknown = set(values) - set(self.__slots__)
        if unknown:
            raise TypeError('JobSpec has no %s' % ', '.join(sorted(unknown)))
        for name in self.__slots__:
            setattr(self, name, values.get(name))
        self.provider_data = dict(self.provider_data or {})
        self.hyperparameters = dict(self.hyperparameters or {})
        self.events = []

    def note(self, message, level='info'):
        self.events.append({'message': message, 'level': level})


class EvaluationSpec(object):
    """One evaluation run, as a provider sees it: two models answer the same examples.

    key               stable for the run (a repeated start finds the run it began)
    folder            where the run's files are (config, status, examples, summary)
    reference         the model compared against (the base model, or the deployed one): its ref
    candidate         the model evaluated (the fine-tuned one): its ref
    examples          the JSONL file of examples (train.jsonl's shape)
    data_format       chat / preference / text
    limits            {'max_examples', 'max_new_tokens', 'batch_size', 'max_length'}
    provider_data     the adapter's own memory across calls (JSON-able); changes are kept
    """
    __slots__ = ('key', 'folder', 'reference', 'candidate', 'examples', 'data_format', 'limits', 'provider_data')

    def __init__(self, **values):
        unknown = set(values) - set(self.__slots__)
        if unknown:
            raise TypeError('EvaluationSpec has no %s' % ', '.join(sorted(unknown)))
        for name in self.__slots__:
            setattr(self, name, values.get(name))
        self.provider_data = dict(self.provider_data or {})
        self.limits = dict(self.limits or {})


class ExportSpec(object):
    """One export of a fine-tuned model, as a provider sees it (lib/export/runner.py's folder).

    key               stable for the export (a repeated start finds the run it began)
    folder            the export's folder as Odoo sees it; out/ in it is what the user takes away
    model             the fine-tuned model's ref (model_ref)
    format            one of lib/export/runner.FORMATS
    job_dir           the job folder (training prompt, config, losses for the card), or None
    card              model card facts only Odoo knows (names and counts, never content)
    convert_dir       llama.cpp's converters on the Odoo host (GGUF formats), or None
    offset            how far events.jsonl has been read
    provider_data     the adapter's own memory across calls (JSON-able); changes are kept
    """
    __slots__ = ('key', 'folder', 'model', 'format', 'job_dir', 'card', 'convert_dir', 'offset', 'provider_data')

    def __init__(self, **values):
        unknown = set(values) - set(self.__slots__)
        if unknown:
            raise TypeError('ExportSpec has no %s' % ', '.join(sorted(unknown)))
        for name in self.__slots__:
            setattr(self, name, values.get(name))
        self.provider_data = dict(self.provider_data or {})
        self.card = dict(self.card or {})
        self.offset = self.offset or 0


class TrainingProvider(object):
    """Base of every adapter. `config`: the provider's settings as a dict (name, base_url,
    request_timeout, trainer_python, models_dir and the service's own); `secret(name)` reads a
    credential only when a call needs it (never stored on the adapter's config)."""
    service = None
    capabilities = {}  # see CAPABILITIES; 'techniques': a tuple, empty when the service chooses its own

    @classmethod
    def default_epochs(cls, train_examples):
        """The epochs a job with epochs 0 ("auto") runs, for its estimate: the local trainer's
        default; a service with its own rule (OpenAI's "auto") overrides this."""
        return DEFAULTS['epochs']

    def __init__(self, config, secret=None):
        self.config = dict(config)
        self._secret = secret

    @property
    def name(self):
        return self.config.get('name') or self.service

    def secret(self, name):
        return self._secret(name) if self._secret else None

    # -- what the engine calls -----------------------------------------------------------------
    def validate(self, spec):
        """Refuse (TrainingFailedError) what this service cannot train, before any file is prepared.
        Nothing to check by default."""
        return None

    def start(self, spec):
        """Start the attempt, or find the run a previous start of `spec.job_key` made. Returns the
        provider's id of the run."""
        raise NotImplementedError

    def check(self, spec):
        """Where the run stands: a report (see the module's docstring)."""
        raise NotImplementedError

    def cancel(self, spec):
        """Ask the service to stop the run; a later `check` confirms it."""
        raise NotImplementedError

    # -- optional services ---------------------------------------------------------------------------
    def start_evaluation(self, spec):
        """Start evaluating `spec.candidate` against `spec.reference` (an EvaluationSpec), or find
        the run a previous start of `spec.key` made. Capability `evaluates`."""
        raise TrainingFailedError('Provider "%s" cannot evaluate models yet; evaluation runs on the local '
                                  'trainer for now.' % self.name)

    def check_evaluation(self, spec):
        """Where the evaluation stands: {'status': 'running' | 'done' | 'failed', 'progress', 'error',
        'summary' (done: {'n', 'data_format', 'reference': {metric: mean}, 'candidate': {...}}),
        'examples' (done: [{'prompt', 'expected', 'reference': {'answer', scores},
        'candidate': {...}}])}."""
        raise TrainingFailedError('Provider "%s" cannot evaluate models yet.' % self.name)

    def cancel_evaluation(self, spec):
        """Stop the evaluation's run (the engine fails a stuck one). An adapter whose runs hold
        nothing between checks has nothing to stop."""
        return None
    def start_export(self, spec):
        """Start exporting `spec.model` (an ExportSpec) where the provider trains, or find the run
        a previous start of `spec.key` made. Returns where it runs, in words. Capability `exports`."""
        raise TrainingFailedError('Provider "%s" cannot export its models: only models trained by a provider that '
                                  'runs our trainer (local, Ray) can be exported.' % self.name)

    def check_export(self, spec):
        """Where the export stands: lib/export/runner.check's report ({'state': 'running' | 'done' |
        'failed', 'events', 'offset', 'manifest' (done), 'error' (failed)})."""
        raise TrainingFailedError('Provider "%s" cannot export its models.' % self.name)

    def token_counter(self, model_ref):
        """A callable counting an example's tokens as this service will, or None (estimated)."""
        return None

    def generate(self, model_ref, prompt, max_new_tokens=128):
        raise TrainingFailedError('Provider "%s" cannot generate replies.' % self.name)

    def chat(self, model_ref, messages, options=None):
        """Answer a conversation ([{'role', 'content'}]) with the model: {'text', 'finish_reason'
        ('stop' or 'length'), 'prompt_tokens', 'completion_tokens'}. `options`: CHAT_OPTIONS."""
        raise TrainingFailedError('Provider "%s" cannot chat with its models.' % self.name)

    def chat_stream(self, model_ref, messages, options=None):
        """The same answer as it is produced: an iterator of {'delta': str}, then one
        {'finish_reason', 'prompt_tokens', 'completion_tokens'}. The request is checked and sent
        before this returns, so refusals raise here, not at the first item."""
        raise TrainingFailedError('Provider "%s" cannot chat with its models.' % self.name)

    def embed(self, model_ref, texts, input_type='passage'):
        """The embedding vectors of `texts` (a list of lists of floats, in order) by the named
        embedding model (knowledge collections); `input_type` 'query' for a question searched
        with, 'passage' for what is indexed (models that make no difference ignore it)."""
        raise TrainingFailedError('Provider "%s" cannot embed texts.' % self.name)

    def list_models(self):
        """The service's models: [{'id': model_ref}]."""
        raise TrainingFailedError('Provider "%s" cannot list its models.' % self.name)

    def test_connection(self):
        """A short text saying the service answers; TrainingFailedError saying what is wrong."""
        raise TrainingFailedError('Provider "%s" has no connection test.' % self.name)
