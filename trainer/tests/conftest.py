import json
import os

import pytest

MODEL_DIR = os.environ.get('LLMT_BASE_MODEL_DIR', os.path.expanduser('~/.cache/llm_training/models/SmolLM2-135M-Instruct'))


@pytest.fixture(scope='session')
def model_dir():
    if not os.path.exists(os.path.join(MODEL_DIR, 'config.json')):
        pytest.fail('the base model is missing at %s: run scripts/setup.sh' % MODEL_DIR)
    return MODEL_DIR


@pytest.fixture(scope='session')
def tokenizer(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)
