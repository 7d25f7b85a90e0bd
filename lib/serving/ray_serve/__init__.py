"""Ray Serve deployments of the model server (trainer/serve_ray.py), as Odoo drives them through
the Serve REST API of the Ray head's dashboard: plain data in, plain data out, no HTTP here (the Ray
adapter sends the requests, with its auth header and its errors).

`PUT /api/serve/applications/` is declarative for the whole cluster: every application not listed
is removed. So each change reads what is deployed (`GET`), puts back every other application as it
was deployed (`deployed_app_config`) and adds, replaces or leaves out ours. Putting the same
config twice changes nothing (Serve compares it with what runs), which makes Deploy, Refresh and
Delete idempotent. Changing only the models (the deployment's `user_config`) is a light update:
the replicas stay up and get the new list (`reconfigure`); a new trainer code version changes the
runtime_env, and Serve replaces the replicas."""
import hashlib
import re

from ..model_server import SERVE_ENGINES

try:  # Python 3.7 (Odoo) has urllib.parse too; the fallback keeps the module importable alone
    from urllib.parse import urlparse
except ImportError:  # pragma: no cover
    from urlparse import urlparse

DEPLOYMENT = 'ModelServer'
IMPORT_PATH = 'trainer.serve_ray:app'
DEFAULT_SERVE_URL = 'http://127.0.0.1:8000'
# Requests a replica takes at once (one generating, one more, e.g. a health check) and callers
# Serve keeps waiting per replica before its proxy answers 503 (Odoo's API: 429 Retry-After).
MAX_ONGOING = 2
MAX_QUEUED = 4


class ServeConfigError(ValueError):
    """Settings that cannot make a deployment, or a cluster state we must not overwrite."""


def application_name(database, provider_id):
    """One application per Odoo database and provider, so that several share a cluster."""
    return 'llmt-%s-p%d' % (re.sub(r'[^A-Za-z0-9_-]+', '-', database), provider_id)


def token_sha256(token):
    """What the deployment knows of its token: the Serve config is readable on the dashboard."""
    return hashlib.sha256(token.encode()).hexdigest()


def replicas_settings(replicas, min_replicas=0, max_replicas=0):
    """`num_replicas`, or an autoscaling_config when a maximum is set (replicas: the initial count)."""
    if replicas < 1:
        raise ServeConfigError('Replicas must be 1 or more (got %d).' % replicas)
    if not max_replicas:
        return {'num_replicas': replicas}
    if min_replicas < 0 or max_replicas < max(min_replicas, 1):
        raise ServeConfigError('Autoscaling needs 0 <= minimum <= maximum and a maximum of 1 or more '
                               '(got %d to %d).' % (min_replicas, max_replicas))
    return {'autoscaling_config': {'min_replicas': min_replicas, 'max_replicas': max_replicas,
                                   'initial_replicas': min(max(replicas, min_replicas), max_replicas),
                                   'target_ongoing_requests': 1}}


def application(name, code_dir, models, token_digest, replicas=1, min_replicas=0, max_replicas=0, cpus=1.0,
                max_adapters=8, engine='auto', convert_dir=None):
    """The Serve application config of one provider's deployment.

    code_dir     the trainer's code as the workers see it (the folder holding `trainer/`)
    models       the model folders it serves, as the workers see them (bases and adapters)
    engine       what generates, as for this host's server (odoo.conf llm_training_serve_engine):
                 auto (llama.cpp on a CPU replica), transformers, llamacpp
    convert_dir  llama.cpp's GGUF converters as the workers see them (None: llama.cpp serves no model
                 under auto, which then uses transformers)"""
    if not models:
        raise ServeConfigError('There is no model to serve: register a model on the provider first.')
    if engine not in SERVE_ENGINES:
        raise ServeConfigError('The serving engine must be one of %s (odoo.conf llm_training_serve_engine), not %r.'
                               % (', '.join(SERVE_ENGINES), engine))
    deployment = dict(replicas_settings(replicas, min_replicas, max_replicas), name=DEPLOYMENT,
                      max_ongoing_requests=MAX_ONGOING, max_queued_requests=MAX_QUEUED,
                      ray_actor_options={'num_cpus': float(cpus)},
                      user_config={'models': sorted(set(models)), 'token_sha256': token_digest,
                                   'max_adapters': max_adapters, 'engine': engine, 'convert_dir': convert_dir})
    return {'name': name, 'route_prefix': '/' + name, 'import_path': IMPORT_PATH,
            'runtime_env': {'env_vars': {'PYTHONPATH': code_dir, 'TOKENIZERS_PARALLELISM': 'false'}},
            'deployments': [deployment]}


def http_options(serve_url):
    """Serve's HTTP proxy options for the URL Odoo reaches it at: its port, and loopback only when
    that URL is on loopback (only used when Serve is not running yet: a running Serve keeps its own)."""
    url = urlparse(serve_url or DEFAULT_SERVE_URL)
    if url.scheme != 'http' or not url.hostname:
        raise ServeConfigError('Serve URL %r must be http://HOST:PORT (Serve\'s HTTP proxy).' % serve_url)
    loopback = url.hostname in ('127.0.0.1', 'localhost', '::1')
    return {'host': '127.0.0.1' if loopback else '0.0.0.0', 'port': url.port or 80}


def deploy_body(details, serve_url, app=None, remove=None):
    """The PUT body from the cluster's current state (`details`, GET's answer): every other
    application as deployed, plus `app` (added or replaced), without the one named `remove`."""
    ours = (app or {}).get('name') or remove
    others = []
    for name, info in sorted((details.get('applications') or {}).items()):
        if name == ours:
            continue
        config = info.get('deployed_app_config')
        if not config:
            raise ServeConfigError('Serve application "%s" on this cluster was not deployed from a config (serve.run '
                                   'in a script): Serve\'s REST API would remove it. Deploy it from a config, or '
                                   'serve these models on another cluster.' % name)
        others.append(config)
    body = {'applications': others + ([app] if app else [])}
    running = details.get('http_options')
    if details.get('controller_info', {}).get('actor_id') and running:
        body['http_options'] = {'host': running.get('host'), 'port': running.get('port')}
        if details.get('proxy_location'):
            body['proxy_location'] = details['proxy_location']
    else:
        body['http_options'] = http_options(serve_url)
    return body


def describe(details, name):
    """(status, text) of our application: status is Serve's (RUNNING, DEPLOYING, DEPLOY_FAILED,
    UNHEALTHY, DELETING) or 'NOT_DEPLOYED'; the text says what runs, for the provider's form."""
    info = (details.get('applications') or {}).get(name)
    if not info:
        return 'NOT_DEPLOYED', 'Not deployed on the cluster.'
    status = info.get('status') or 'UNKNOWN'
    deployment = (info.get('deployments') or {}).get(DEPLOYMENT) or {}
    replicas = [r for r in deployment.get('replicas') or () if r.get('state') == 'RUNNING']
    config = ((info.get('deployed_app_config') or {}).get('deployments') or [{}])[0]
    models = len((config.get('user_config') or {}).get('models') or ())
    text = '%s: %d replica(s) running, %d model folder(s) served at route %s' % (
        status, len(replicas), models, info.get('route_prefix') or '/' + name)
    message = (info.get('message') or deployment.get('message') or '').strip()
    if message and status != 'RUNNING':
        text += '. %s' % message[-500:]
    return status, text
