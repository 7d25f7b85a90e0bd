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


@pytest.fixture(scope='session')
def adapters(model_dir, tmp_path_factory):
    """Two LoRA adapters with random weights (no training) on the base model, saved as folders
    (shared by the model server's tests)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=['q_proj', 'v_proj'],
                                                init_lora_weights=False))
        folder = str(tmp_path_factory.mktemp('adapter%d' % seed))
        model.save_pretrained(folder)
        with open(os.path.join(folder, 'adapter_config.json')) as f:
            assert json.load(f)['base_model_name_or_path'] == model_dir
        folders.append(folder)
    return folders
