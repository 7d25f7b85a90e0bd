"""Export: Hugging Face folders and GGUF (llama.cpp's own converters), each loaded back and made
to answer a training prompt as the fine-tuned model does; the Ollama Modelfile; the model card."""
import json
import os
import sys

import pytest

from trainer import export
from trainer.tests.helpers import write_job

CHATML = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
LLAMA3 = "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
MISTRAL = "{{ '[INST] ' + message['content'] + ' [/INST]' }}"


# -- Modelfile (plain function) ------------------------------------------------------------------

def test_modelfile_chatml_has_template_stops_and_system_prompt():
    text = export.modelfile('model-f16.gguf', CHATML, system_prompt='You answer in French.')
    lines = text.splitlines()
    assert 'FROM ./model-f16.gguf' in lines
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text
    assert '<|im_start|>assistant\n"""' in text
    assert 'PARAMETER stop "<|im_start|>"' in lines and 'PARAMETER stop "<|im_end|>"' in lines
    assert 'SYSTEM """You answer in French."""' in lines
    assert not any(line.startswith('ADAPTER') for line in lines)


def test_modelfile_llama3_and_mistral_templates():
    llama3 = export.modelfile('m.gguf', LLAMA3)
    assert '<|start_header_id|>{{ .Role }}<|end_header_id|>' in llama3
    assert 'PARAMETER stop "<|eot_id|>"' in llama3.splitlines()
    mistral = export.modelfile('m.gguf', MISTRAL)
    assert '[INST] ' in mistral and '{{ .Content }}[/INST]' in mistral
    assert 'PARAMETER stop "[/INST]"' in mistral.splitlines()
    assert 'SYSTEM' not in llama3 and 'SYSTEM' not in mistral


def test_modelfile_unknown_format_has_no_template_but_a_note_and_adapter_line():
    text = export.modelfile('base-f16.gguf', '{{ bos_token }}{{ messages }}', adapter_name='adapter-f16.gguf')
    lines = text.splitlines()
    assert lines[1:3] == ['FROM ./base-f16.gguf', 'ADAPTER ./adapter-f16.gguf']
    assert not any(line.startswith(('TEMPLATE', 'PARAMETER stop')) for line in lines)
    assert any(line.startswith('# No TEMPLATE') for line in lines)


def test_modelfile_quotes_a_system_prompt_with_triple_quotes():
    text = export.modelfile('m.gguf', CHATML, system_prompt='say """hi"""')
    assert 'SYSTEM """say \\"\\"\\"hi\\"\\"\\""""' in text


def test_chat_format_of_the_base_model(model_dir):
    assert export.chat_format(export.chat_template_text(model_dir)) == 'chatml'


def test_model_card_names_data_hyperparameters_losses_and_licence():
    card = export.model_card({'name': 'support-bot v2', 'format': 'gguf_f16', 'base_name': 'SmolLM2-135M-Instruct',
                              'license': 'apache-2.0', 'technique': 'lora',
                              'datasets': [{'name': 'faq.jsonl', 'examples': 120}],
                              'hyperparameters': {'epochs': 2, 'lora_r': 8, 'base_model_path': '/secret/path'},
                              'losses': {'train_loss': 0.25}, 'evaluation': {'chrF': 71.2}})
    assert '- Base model: SmolLM2-135M-Instruct' in card
    assert '- Licence of the base model: apache-2.0' in card
    assert '- faq.jsonl: 120 examples' in card
    assert '- epochs: 2' in card and '- lora_r: 8' in card and '/secret/path' not in card
    assert '- final training loss: 0.25' in card and '- final validation loss: not measured' in card
    assert '- chrF: 71.2' in card
    assert 'ollama create' in card


# -- real exports of a tiny trained adapter ------------------------------------------------------

@pytest.fixture(scope='module')
def trained(model_dir, tmp_path_factory):
    """A job folder as the trainer leaves it (train.jsonl, config.json, metrics.jsonl, result/ with
    a LoRA adapter and its tokenizer), the adapter with random weights instead of trained ones (as
    test_serve.py makes them: training adds a minute and nothing the export reads)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = write_job(str(tmp_path_factory.mktemp('job')), model_dir, n_train=12, n_valid=2,
                       lora_r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'])
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'], init_lora_weights=False))
    model.save_pretrained(os.path.join(folder, 'result'))
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(os.path.join(folder, 'result'))
    with open(os.path.join(folder, 'metrics.jsonl'), 'w') as f:
        f.write(json.dumps({'step': 1, 'train_loss': 2.5, 'valid_loss': None}) + '\n')
        f.write(json.dumps({'step': 2, 'train_loss': 1.25, 'valid_loss': 1.5}) + '\n')
    return folder


def read_events(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def run_export(trained, tmp_path, fmt, **kwargs):
    out = str(tmp_path / fmt)
    events = str(tmp_path / ('%s.events.jsonl' % fmt))
    code = export.main(['--model', os.path.join(trained, 'result'), '--job-dir', trained, '--out', out,
                        '--format', fmt, '--events', events] + sum((['--%s' % k, v] for k, v in kwargs.items()), []))
    return code, out, read_events(events)


def verification(events):
    found = [e['data']['verification'] for e in events if (e.get('data') or {}).get('verification')]
    assert len(found) == 1, events
    return found[0]


def test_hf_merged_loads_in_transformers_and_answers_as_the_fine_tuned_model(trained, tmp_path):
    code, out, events = run_export(trained, tmp_path, 'hf_merged')
    assert code == 0, events
    names = set(os.listdir(out))
    assert {'model.safetensors', 'config.json', 'tokenizer.json', 'chat_template.jinja', 'README.md',
            'export.json'} <= names, names
    assert 'adapter_config.json' not in names
    check = verification(events)
    assert check['same_tokens'] == check['compared_tokens'] == export.VERIFY_TOKENS
    card = open(os.path.join(out, 'README.md')).read()
    assert 'training examples: 12, validation examples: 2' in card
    assert '- final training loss: 1.25' in card and '- final validation loss: 1.5' in card
    assert '- lora_r: 4' in card and 'base_model_path' not in card
    manifest = json.load(open(os.path.join(out, 'export.json')))
    sizes = {f['path']: f['size'] for f in manifest['files']}
    assert sizes['model.safetensors'] == os.path.getsize(os.path.join(out, 'model.safetensors'))
    assert not [n for n in names if n.startswith('.work-')]


def test_hf_adapter_is_the_adapter_with_its_tokenizer(trained, tmp_path):
    code, out, events = run_export(trained, tmp_path, 'hf_adapter')
    assert code == 0, events
    assert {'adapter_model.safetensors', 'adapter_config.json', 'tokenizer.json', 'README.md'} <= set(os.listdir(out))
    check = verification(events)
    assert check['same_tokens'] == export.VERIFY_TOKENS


def test_gguf_f16_runs_in_llama_cpp_with_the_same_first_16_tokens(trained, tmp_path):
    code, out, events = run_export(trained, tmp_path, 'gguf_f16')
    assert code == 0, events
    assert os.path.getsize(os.path.join(out, 'model-f16.gguf')) > 200e6  # 135M parameters at 2 bytes
    check = verification(events)
    assert check['same_tokens'] == export.VERIFY_TOKENS, check
    modelfile = open(os.path.join(out, 'Modelfile')).read()
    assert 'FROM ./model-f16.gguf' in modelfile and '<|im_start|>' in modelfile


def test_gguf_q8_0_runs_and_reports_its_agreement(trained, tmp_path):
    code, out, events = run_export(trained, tmp_path, 'gguf_q8_0')
    assert code == 0, events
    size = os.path.getsize(os.path.join(out, 'model-q8_0.gguf'))
    assert 100e6 < size < 200e6, size
    check = verification(events)
    assert check['answer'], check  # llama.cpp answered; how many tokens agree is reported, not required
    print('q8_0 agreement: %d of %d tokens' % (check['same_tokens'], check['compared_tokens']))


def test_gguf_q4_0_is_4_bit_and_runs(trained, tmp_path):
    code, out, events = run_export(trained, tmp_path, 'gguf_q4_0')
    assert code == 0, events
    size = os.path.getsize(os.path.join(out, 'model-q4_0.gguf'))
    assert 60e6 < size < 110e6, size  # q4_0 layers (4.5 bits a weight) and the q8_0 embedding
    sys.path.insert(0, os.path.join(export.convert_dir(), 'gguf-py'))
    import gguf
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(os.path.join(out, 'model-q4_0.gguf')).tensors}
    assert kinds['blk.0.attn_q.weight'] == 'Q4_0' and kinds['token_embd.weight'] == 'Q8_0', kinds
    check = verification(events)
    assert check['answer'], check  # llama.cpp answered; the agreement is reported, not required
    print('q4_0 agreement: %d of %d tokens' % (check['same_tokens'], check['compared_tokens']))


def test_gguf_lora_runs_on_the_base_gguf(trained, tmp_path, model_dir, monkeypatch):
    from trainer.llamacpp_engine import GGUF_CACHE_ENV, GgufFiles
    monkeypatch.setenv(GGUF_CACHE_ENV, str(tmp_path / 'server-gguf'))
    code, out, events = run_export(trained, tmp_path, 'gguf_lora')
    assert code == 0, events
    assert {'base-f16.gguf', 'adapter-f16.gguf', 'Modelfile'} <= set(os.listdir(out))
    modelfile = open(os.path.join(out, 'Modelfile')).read().splitlines()
    assert 'FROM ./base-f16.gguf' in modelfile and 'ADAPTER ./adapter-f16.gguf' in modelfile
    check = verification(events)
    assert check['same_tokens'] == export.VERIFY_TOKENS, check
    # the model server's GGUF cache took both files: serving the fine-tune converts nothing (no
    # converters here), and gets the export's files
    served = GgufFiles(convert_dir=str(tmp_path / 'no-converters'))
    assert os.path.samefile(served.adapter(os.path.join(trained, 'result'), model_dir),
                            os.path.join(out, 'adapter-f16.gguf'))
    assert os.path.samefile(served.base(model_dir), os.path.join(out, 'base-f16.gguf'))


def test_a_file_in_the_way_fails_with_an_event_and_the_model_is_untouched(trained, tmp_path):
    result = os.path.join(trained, 'result')
    before = sorted(os.listdir(result))
    blocker = tmp_path / 'blocker'
    blocker.write_text('not a folder')
    code = export.main(['--model', result, '--out', str(blocker / 'out'), '--format', 'hf_merged',
                        '--events', str(tmp_path / 'ev.jsonl')])
    events = read_events(str(tmp_path / 'ev.jsonl'))
    assert code == 1 and 'cannot write the export folder' in events[-1]['message']
    assert sorted(os.listdir(result)) == before


def test_a_whole_model_cannot_be_exported_as_an_adapter(model_dir, tmp_path):
    with pytest.raises(export.ExportError, match='needs a LoRA adapter'):
        export.export(model_dir, str(tmp_path / 'o'), 'gguf_lora')


def test_an_architecture_llama_cpp_does_not_know_fails_with_its_message_and_leaves_nothing(model_dir, tmp_path):
    """A tiny OPT model (transformers knows it, llama.cpp's converter does not): the converter's own
    error becomes the export's, and the half-written folder is removed."""
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(1)
    tiny = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=16, word_embed_proj_dim=16, ffn_dim=32,
                                    num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=256,
                                    pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=tokenizer.eos_token_id))
    folder = str(tmp_path / 'opt')
    tiny.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out, events_file = str(tmp_path / 'out'), str(tmp_path / 'events.jsonl')
    code = export.main(['--model', folder, '--out', out, '--format', 'gguf_f16', '--events', events_file])
    events = read_events(events_file)
    assert code == 1
    assert events[-1]['level'] == 'error'
    assert 'convert_hf_to_gguf.py failed' in events[-1]['message'], events[-1]
    assert 'Model OPTForCausalLM is not supported' in events[-1]['message'], events[-1]
    assert 'INFO:' not in events[-1]['message']  # the converter's error, not its progress
    assert not os.path.exists(out)
