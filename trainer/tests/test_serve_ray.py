"""The Ray Serve deployment (trainer/serve_ray.py) builds its engine as the local model server does
(make_engine with the setting of its user_config): llama.cpp when the config says so, transformers
otherwise, and its health says which. Driven in-process (the class under Serve's decorator, a real
Starlette request); the addon's tests/test_ray_serve.py deploys it on a real Ray head."""
import asyncio
import hashlib
import os

import pytest

from trainer import serve

PROMPT = [{'role': 'user', 'content': 'Why is the sky blue?'}]


def health(deployment, token):
    from starlette.requests import Request
    scope = {'type': 'http', 'method': 'GET', 'path': '/llmt-db-p1/health', 'query_string': b'',
             'headers': [(b'authorization', ('Bearer %s' % token).encode())]}
    answer = asyncio.run(deployment(Request(scope)))
    assert answer.status_code == 200, answer.body
    import json
    return json.loads(answer.body)


def test_the_deployment_serves_with_the_engine_its_config_names(model_dir):
    from trainer.serve_ray import ModelServerDeployment, check_config
    with pytest.raises(ValueError, match='"engine" must be one of auto, transformers, llamacpp'):
        check_config({'models': [model_dir], 'token_sha256': 'f' * 64, 'engine': 'vllm'})
    token = 'serve-token'
    config = {'models': [model_dir], 'token_sha256': hashlib.sha256(token.encode()).hexdigest(), 'engine': 'llamacpp',
              'convert_dir': os.environ.get('LLMT_LLAMA_CONVERT_DIR')}
    deployment = ModelServerDeployment.func_or_class()
    request = serve.parse_chat_request({'model': model_dir, 'messages': PROMPT, 'max_tokens': 8})
    deployment.reconfigure(config)
    try:
        first = deployment.engine
        by_llama = first.whole_answer(request)['text']
        state = health(deployment, token)['engine']
        assert state['setting'] == 'llamacpp'
        assert [m['base'] for m in state['llamacpp']['models']] == [os.path.realpath(model_dir)]
        assert state['stats']['finished'] == 0  # transformers' engine answered nothing

        deployment.reconfigure(dict(config, engine='transformers'))  # a new engine; the old one closes
        assert deployment.engine is not first and deployment.engine.llamacpp is None
        assert deployment.engine.whole_answer(request)['text'] == by_llama  # greedy: f16 llama.cpp = fp32 here
        state = health(deployment, token)
        assert state['engine']['setting'] == 'transformers' and 'llamacpp' not in state['engine']
        assert state['loaded']['base'] == os.path.realpath(model_dir)
    finally:
        if deployment.engine is not None:
            deployment.engine.close()
