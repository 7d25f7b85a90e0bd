"""Chat for the providers whose models answer through our model server (trainer/serve.py): on
this host, or as a Ray Serve deployment on the provider's cluster. Not an adapter: a mixin the
adapters share (the local trainer, the Ray provider), so that neither imports the other."""
import os

from ..exceptions import InvalidRequestError, TrainingFailedError, TrainingRetryableError
from ..host.trainer_env import ADDON_ROOT, trainer_env
from ..serving.model_server import ModelServer, ModelServerError, chat_endpoint
from .base import CHAT_OPTIONS


class ServedChat(object):
    """generate / chat / chat_stream through the endpoint lib/serving/model_server.chat_endpoint chooses for
    the provider: this host's model server, or its Ray Serve deployment. A provider says with
    `served_path(model_ref, where)` which folder that side ('host' or 'cluster') reads."""

    def served_path(self, model_ref, where):
        raise NotImplementedError

    def model_server(self):
        """The persistent model server (trainer/serve.py) of this Odoo data folder: one process
        shared by every worker, started on first use, keeping the last base model loaded."""
        run_dir = self.config.get('model_server_dir') or os.path.join(ADDON_ROOT, '.run', 'model_server')
        return ModelServer(self.config.get('trainer_python') or 'python3', run_dir, env=trainer_env(), cwd=ADDON_ROOT,
                           allowed_roots=self.config.get('model_roots') or [self.config['models_dir']],
                           private_top=os.path.dirname(run_dir),  # <data_dir>/llm_training: job folders too
                           **self.config.get('serve_settings', {}))  # odoo.conf's batching settings

    def chat_endpoint(self):
        try:
            return chat_endpoint(self.config, self.model_server, lambda: self.secret('serve_token'))
        except ModelServerError as e:
            raise generation_failed(e)

    def generate(self, model_ref, prompt, max_new_tokens=128):
        """The model form's Test button and Compare Models: one user message, greedy."""
        answer = self.chat(model_ref, [{'role': 'user', 'content': prompt}], {'max_tokens': max_new_tokens})
        return answer['text'].strip()

    def chat(self, model_ref, messages, options=None):
        options, endpoint = chat_options(options), self.chat_endpoint()
        path = self.served_path(model_ref, endpoint.where)
        try:
            return endpoint.chat(path, messages, **options)
        except ModelServerError as e:
            raise generation_failed(e)

    def chat_stream(self, model_ref, messages, options=None):
        options, endpoint = chat_options(options), self.chat_endpoint()
        path = self.served_path(model_ref, endpoint.where)
        try:
            items = endpoint.chat_stream(path, messages, **options)
        except ModelServerError as e:
            raise generation_failed(e)
        return _failed_on_error(items)


def chat_options(options):
    """The options the model server takes, without the unset ones; an unknown one is refused
    rather than ignored."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(CHAT_OPTIONS))
    if unknown:
        raise InvalidRequestError('Unknown chat option(s) %s; the model server takes %s.'
                                  % (', '.join(unknown), ', '.join(CHAT_OPTIONS)))
    return {k: v for k, v in options.items() if v is not None}


def generation_failed(error):
    """The model server's refusal of the request itself (400, 413) is the caller's to fix; a busy
    server (503, its waiting line full) is worth a retry after its Retry-After; anything else is
    the server's failure."""
    message = 'Generation failed: %s' % error
    if error.status == 503:
        return TrainingRetryableError(message, seconds=error.retry_after or 5)
    return InvalidRequestError(message) if error.status in (400, 413) else TrainingFailedError(message)


def _failed_on_error(items):
    try:
        for item in items:
            yield item
    except ModelServerError as e:
        raise TrainingFailedError('Generation failed: %s' % e)
    finally:
        items.close()
