"""Export a fine-tuned model so it runs elsewhere, and check what was written by running it.

    python -m trainer.export --model RESULT_DIR [--job-dir JOB_DIR] --out OUT --format FORMAT

Formats:
  hf_adapter  the LoRA adapter folder (safetensors, tokenizer, chat template), used with its base
  hf_merged   the adapter merged into its base (peft merge_and_unload): a plain Hugging Face folder
  gguf_f16    GGUF of the merged model, f16, for llama.cpp / Ollama / LM Studio
  gguf_q8_0   the same, quantised to q8_0
  gguf_q4_0   the same, 4-bit: q4_0 weights, the token embedding q8_0 (requantize_q4_0)
  gguf_lora   the base model as an f16 GGUF plus the LoRA adapter as a GGUF (llama.cpp's --lora,
              Ollama's ADAPTER)
Every export gets a model card (README.md); the GGUF ones an Ollama Modelfile. GGUF files are made
by llama.cpp's own converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py and their gguf-py,
installed by scripts/setup.sh from llama-cpp-python's source distribution), run with this Python.

Verification: the fine-tuned model answers one training prompt greedily (transformers); the export
is loaded back (transformers for the HF folders, llama.cpp in-process through xllamacpp for the
GGUF) and answers the same prompt; the first VERIFY_TOKENS tokens are compared. Events (progress,
the verification) go to --events FILE as JSON lines (the Odoo side reads them) and to stderr.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

from . import job_files

FORMATS = ('hf_adapter', 'hf_merged', 'gguf_f16', 'gguf_q8_0', 'gguf_q4_0', 'gguf_lora')
VERIFY_TOKENS = 16
CONVERT_DIR_ENV = 'LLMT_LLAMA_CONVERT_DIR'
CARD = 'README.md'
MODELFILE = 'Modelfile'
MANIFEST = 'export.json'  # what was written: files, sizes, checksums, the verification


class ExportError(Exception):
    """An export that cannot be done, with what to fix."""


# -- events --------------------------------------------------------------------------------------

class Events(object):
    """Progress and outcome, one JSON object a line (the job folder's events.jsonl shape)."""

    def __init__(self, path=None):
        self.path = path

    def __call__(self, message, level='info', **data):
        record = {'id': '%d-%s' % (os.getpid(), time.time()), 'created_at': int(time.time()),
                  'level': level, 'message': message, 'data': data or None}
        if self.path:
            with open(self.path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        print('[export] %s' % message, file=sys.stderr, flush=True)


# -- the model to export -------------------------------------------------------------------------

def read_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def describe_model(model_dir, base_dir=None):
    """(kind, base folder): kind 'adapter' for a peft LoRA folder, 'full' for a whole model."""
    adapter_config = read_json(os.path.join(model_dir, 'adapter_config.json'))
    if adapter_config is not None:
        base = base_dir or adapter_config.get('base_model_name_or_path')
        if not base or not os.path.isfile(os.path.join(base, 'config.json')):
            raise ExportError('%s: the adapter\'s base model folder %r is missing; pass --base' % (model_dir, base))
        return 'adapter', base
    if os.path.isfile(os.path.join(model_dir, 'config.json')):
        return 'full', base_dir
    raise ExportError('%s: neither a LoRA adapter (adapter_config.json) nor a model folder (config.json)' % model_dir)


def load_finetuned(model_dir, base_dir=None):
    """The fine-tuned model as trained (base + adapter, not merged) and its tokenizer, fp32, eval."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kind, base = describe_model(model_dir, base_dir)
    if kind == 'adapter':
        from peft import PeftModel
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer_dir = model_dir if os.path.exists(os.path.join(model_dir, 'tokenizer_config.json')) else base
    return model.eval(), AutoTokenizer.from_pretrained(tokenizer_dir)


def chat_template_text(folder):
    """The chat template the folder's tokenizer uses, '' when none."""
    path = os.path.join(folder, 'chat_template.jinja')
    if os.path.exists(path):
        with open(path) as f:
            return f.read()
    template = (read_json(os.path.join(folder, 'tokenizer_config.json'), {}) or {}).get('chat_template') or ''
    return template if isinstance(template, str) else ''


def training_prompt(job_dir):
    """The messages of the first training example up to its first assistant reply (the prompt the
    export is checked on), or a fixed question when no job folder is given."""
    path = os.path.join(job_dir, job_files.TRAIN_FILE) if job_dir else None
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                messages = (json.loads(line).get('messages') or [])
                for i, message in enumerate(messages):
                    if message.get('role') == 'assistant' and i:
                        return [{'role': m['role'], 'content': m.get('content') or ''} for m in messages[:i]]
    return [{'role': 'user', 'content': 'What can you do?'}]


def prompt_text(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def greedy_ids(model, tokenizer, text, n=VERIFY_TOKENS):
    """The first n token ids a model picks greedily after `text` (no early stop: the comparison
    wants exactly n tokens from each side)."""
    import torch
    inputs = tokenizer(text, return_tensors='pt', add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return out[0, inputs['input_ids'].shape[1]:].tolist()


# -- Hugging Face folders ------------------------------------------------------------------------

def save_tokenizer(tokenizer, out):
    tokenizer.save_pretrained(out)  # tokenizer.json, tokenizer_config.json, chat_template.jinja


def export_hf_adapter(model, tokenizer, out):
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)


def export_hf_merged(model, tokenizer, out):
    """The merged weights in a plain folder: peft's merge_and_unload on a copy, so the fine-tuned
    model stays as trained for the comparison."""
    import copy
    merged = copy.deepcopy(model)
    if hasattr(merged, 'merge_and_unload'):
        merged = merged.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    # A folder that transformers 4 loads too: it reads rope_theta at the top level only.
    config_path = os.path.join(out, 'config.json')
    config = read_json(config_path)
    theta = (config.get('rope_parameters') or {}).get('rope_theta')
    if theta is not None and 'rope_theta' not in config:
        config['rope_theta'] = theta
        with open(config_path, 'w') as f:
            json.dump(config, f, indent=2)


# -- GGUF through llama.cpp's converters ---------------------------------------------------------

def convert_dir(path=None):
    path = path or os.environ.get(CONVERT_DIR_ENV)
    if not path or not os.path.isfile(os.path.join(path, 'convert_hf_to_gguf.py')):
        raise ExportError('llama.cpp\'s converters are not at %r: run scripts/setup.sh (it installs them) or pass '
                          '--convert-dir / set %s' % (path, CONVERT_DIR_ENV))
    return path


def run_converter(args, events):
    """Run one of llama.cpp's scripts with this Python; its last lines become the error."""
    env = dict(os.environ)
    env.pop('NO_LOCAL_GGUF', None)  # the scripts' own gguf-py, the version they were written for
    process = subprocess.run([sys.executable] + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    output = process.stdout.decode(errors='replace')
    if process.returncode:
        lines = output.strip().splitlines()
        tail = '\n'.join(([line for line in lines if not line.startswith('INFO:')] or lines)[-8:])
        raise ExportError('%s failed (exit %d):\n%s' % (os.path.basename(args[0]), process.returncode, tail))
    return output


def convert_hf_to_gguf(model_dir, outfile, outtype, convert, events):
    events('Converting %s to GGUF %s' % (os.path.basename(model_dir.rstrip('/')), outtype))
    run_converter([os.path.join(convert, 'convert_hf_to_gguf.py'), model_dir, '--outfile', outfile,
                   '--outtype', outtype], events)
    return outfile


def convert_lora_to_gguf(adapter_dir, base_dir, outfile, convert, events):
    events('Converting the LoRA adapter to GGUF f16')
    run_converter([os.path.join(convert, 'convert_lora_to_gguf.py'), adapter_dir, '--base', base_dir,
                   '--outfile', outfile, '--outtype', 'f16'], events)
    return outfile


def serving_cache(items):
    """For [(kind, folder)] ('base': a model folder, 'lora': an adapter folder), taken before their
    GGUF f16 are made: a function giving those files, once made, to the model server's GGUF cache
    (trainer/llamacpp_engine.GgufFiles, on this machine), so that serving the model with llama.cpp
    does not convert it again. A folder rewritten meanwhile is left out (its cache name changed)."""
    from trainer.llamacpp_engine import GgufFiles
    files = GgufFiles()
    expected = [(kind, folder, files.path(kind, folder)) for kind, folder in items]

    def keep(made, events):
        for (kind, folder, before), path in zip(expected, made):
            try:
                kept = files.adopt(kind, folder, path, before)
            except OSError as e:  # the export stands; the server converts it itself
                events('The model server\'s GGUF cache did not take %s: %s' % (os.path.basename(path), e),
                       level='warning')
                continue
            if kept:
                events('%s kept for the model server (%s)' % (os.path.basename(path), kept))
    return keep


def requantize_q4_0(src, dst, convert, events):
    """A 4-bit GGUF from the f16 one. llama.cpp's 4-bit quantizer is its compiled `llama-quantize`,
    which no wheel here ships, and the converter writes at most q8_0; but the converter's own
    library, gguf-py, has llama.cpp's reference q4_0 quantizer (numpy). So: every 2-D weight whose
    rows split into q4_0 blocks goes to q4_0, the token embedding (also the output head when tied, as
    in SmolLM2) to q8_0, as llama-quantize keeps that tensor above 4 bits (it uses q6_k, which
    gguf-py cannot write); the rest (norms) stays as converted. The metadata is copied unchanged
    but for the file type."""
    sys.path.insert(0, os.path.join(convert, 'gguf-py'))
    import gguf
    import numpy

    events('Quantising %s to q4_0 (gguf-py\'s reference quantizer)' % os.path.basename(src))
    qt = gguf.GGMLQuantizationType
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith('GGUF.'):
            continue  # written by the writer itself
        kind = field.types[0]
        value = int(gguf.LlamaFileType.MOSTLY_Q4_0) if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        writer.add_key_value(field.name, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    tensors = []
    for tensor in reader.tensors:
        data, kind = tensor.data, tensor.tensor_type
        if kind in (qt.F16, qt.F32) and data.ndim == 2 and tensor.name.endswith('.weight'):
            target = qt.Q8_0 if tensor.name in ('token_embd.weight', 'output.weight') else qt.Q4_0
            try:
                data, kind = gguf.quants.quantize(numpy.asarray(data, dtype=numpy.float32), target), target
            except gguf.QuantError:
                pass  # rows not a whole number of blocks: kept as converted
        tensors.append((tensor.name, data, kind))
    for name, data, kind in tensors:
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _name, data, _kind in tensors:
        writer.write_tensor_data(data)
    writer.close()
    return dst


def gguf_greedy_text(gguf_path, prompt, n=VERIFY_TOKENS, lora_path=None, threads=None):
    """llama.cpp's greedy continuation of `prompt` (the chat template already applied), n tokens,
    run in-process by xllamacpp on the CPU."""
    import xllamacpp as xlc
    params = xlc.CommonParams()
    params.model.path = gguf_path
    params.n_ctx = 512
    params.n_predict = n
    params.cpuparams.n_threads = threads or max(1, min(4, os.cpu_count() or 1))
    params.warmup = False
    if lora_path:
        adapter = xlc.CommonAdapterLoraInfo(lora_path, 1.0)
        params.lora_adapters = [adapter]
    server = xlc.Server(params)
    request = {'prompt': prompt, 'n_predict': n, 'temperature': 0.0, 'top_k': 1, 'seed': 1,
               'ignore_eos': True, 'cache_prompt': False, 'stream': False}
    answer = server.handle_completions(request)
    if isinstance(answer, str):
        answer = json.loads(answer)
    try:
        return answer['choices'][0]['text']  # OpenAI's completion shape
    except (KeyError, IndexError, TypeError):
        raise ExportError('llama.cpp did not answer from %s: %s' % (gguf_path, str(answer)[:500]))


# -- Ollama --------------------------------------------------------------------------------------

# Ollama's template syntax (Go templates) for the chat formats our base models use; the same
# shapes as Ollama's own library templates (chatml, llama3-instruct, mistral-instruct).
OLLAMA_TEMPLATES = {
    'chatml': ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
               '<|im_start|>assistant\n', ['<|im_start|>', '<|im_end|>']),
    'llama3': ('{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
               '{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n',
               ['<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>']),
    'mistral': ('{{- range $index, $_ := .Messages }}\n{{- if eq .Role "user" }}[INST] '
                '{{ if and (eq (len (slice $.Messages $index)) 1) $.System }}{{ $.System }}\n\n{{ end }}'
                '{{ .Content }}[/INST]\n{{- else if eq .Role "assistant" }} {{ .Content }}</s>\n{{- end }}\n{{- end }}',
                ['[INST]', '[/INST]', '</s>']),
}


def chat_format(template):
    """'chatml', 'llama3', 'mistral' or None, read from a Hugging Face chat template's markers."""
    template = template or ''
    if '<|im_start|>' in template:
        return 'chatml'
    if '<|start_header_id|>' in template:
        return 'llama3'
    if '[INST]' in template:
        return 'mistral'
    return None


def _quote(text):
    return '"""%s"""' % text.replace('"""', '\\"\\"\\"')


def modelfile(gguf_name, template, system_prompt=None, adapter_name=None, parameters=None):
    """An Ollama Modelfile for a GGUF beside it (`ollama create NAME -f Modelfile`)."""
    fmt = chat_format(template)
    lines = ['# Ollama: ollama create <name> -f Modelfile, then ollama run <name>',
             'FROM ./%s' % gguf_name]
    if adapter_name:
        lines.append('ADAPTER ./%s' % adapter_name)
    if fmt:
        text, stops = OLLAMA_TEMPLATES[fmt]
        lines.append('TEMPLATE %s' % _quote(text))
        for stop in stops:
            lines.append('PARAMETER stop "%s"' % stop)
    else:
        lines.append('# No TEMPLATE: this model\'s chat template is not one written here (ChatML, Llama 3, '
                     'Mistral); Ollama uses the template stored in the GGUF (tokenizer.chat_template) if it '
                     'recognises it. Check `ollama show --template <name>`.')
    for key, value in sorted((parameters or {}).items()):
        lines.append('PARAMETER %s %s' % (key, value))
    if system_prompt:
        lines.append('SYSTEM %s' % _quote(system_prompt))
    return '\n'.join(lines) + '\n'


# -- model card ----------------------------------------------------------------------------------

def base_license(base_dir, given=None):
    if given:
        return given
    readme = os.path.join(base_dir or '', 'README.md')
    if base_dir and os.path.exists(readme):
        with open(readme) as f:
            head = f.read(4000)
        if head.startswith('---'):
            for line in head.split('---')[1].splitlines():
                if line.strip().startswith('license:'):
                    return line.split(':', 1)[1].strip()
    return None


def job_losses(job_dir):
    """The last measured train and validation loss in the job's metrics.jsonl."""
    losses = {}
    path = os.path.join(job_dir or '', 'metrics.jsonl')
    if job_dir and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line being written
                for key in ('train_loss', 'valid_loss'):
                    if record.get(key) is not None:
                        losses[key] = record[key]
    return losses


def count_lines(path):
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def model_card(info):
    """README.md for the export: base, data (names and counts, never content), hyperparameters,
    losses, evaluation, licence, how to run it."""
    lines = ['# %s' % (info.get('name') or 'Fine-tuned model'), '',
             'Fine-tuned with the Odoo addon llm_training; exported as `%s`.' % info['format'], '',
             '- Base model: %s' % (info.get('base_name') or info.get('base_path') or 'unknown'),
             '- Licence of the base model: %s' % (info.get('license') or
                                                 'not recorded; check the base model\'s source before redistributing'),
             '- Technique: %s' % (info.get('technique') or 'unknown')]
    if info.get('system_prompt'):
        lines.append('- System prompt: %s' % info['system_prompt'])
    lines += ['', '## Data', '']
    datasets = info.get('datasets') or []
    for dataset in datasets:
        lines.append('- %s: %s examples' % (dataset.get('name'), dataset.get('examples', '?')))
    if not datasets:
        lines.append('- training examples: %s, validation examples: %s' % (info.get('train_examples', '?'),
                                                                         info.get('valid_examples', '?')))
    lines += ['', '## Hyperparameters', '']
    for key, value in sorted((info.get('hyperparameters') or {}).items()):
        if key not in ('base_model_path', 'resume') and value is not None:
            lines.append('- %s: %s' % (key, value))
    lines += ['', '## Results', '']
    losses = info.get('losses') or {}
    lines.append('- final training loss: %s' % (losses.get('train_loss', 'not measured')))
    lines.append('- final validation loss: %s' % (losses.get('valid_loss', 'not measured')))
    for key, value in sorted((info.get('evaluation') or {}).items()):
        lines.append('- %s: %s' % (key, value))
    verification = info.get('verification')
    if verification:
        lines += ['', '## Verification', '', verification['summary']]
    lines += ['', '## Running it', '', RUN_NOTES[info['format']], '']
    return '\n'.join(lines)


RUN_NOTES = {
    'hf_adapter': 'transformers + peft: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), '
                  'THIS_FOLDER)`.',
    'hf_merged': 'transformers: `AutoModelForCausalLM.from_pretrained(THIS_FOLDER)`; or convert it with '
                 'llama.cpp\'s convert_hf_to_gguf.py.',
    'gguf_f16': 'llama.cpp: `llama-cli -m model-f16.gguf -cnv`; Ollama: `ollama create NAME -f Modelfile`.',
    'gguf_q8_0': 'llama.cpp: `llama-cli -m model-q8_0.gguf -cnv`; Ollama: `ollama create NAME -f Modelfile`.',
    'gguf_q4_0': 'llama.cpp: `llama-cli -m model-q4_0.gguf -cnv`; Ollama: `ollama create NAME -f Modelfile`.',
    'gguf_lora': 'llama.cpp: `llama-cli -m base-f16.gguf --lora adapter-f16.gguf -cnv`; Ollama: '
                 '`ollama create NAME -f Modelfile` (FROM the base, ADAPTER the adapter).',
}


# -- the export ----------------------------------------------------------------------------------

def sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def check_writable(out):
    """Fail before any work when the target cannot be written."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix='.probe', delete=True)
        probe.close()
    except OSError as e:
        raise ExportError('cannot write the export folder %s: %s' % (out, e.strerror or e))
    if os.listdir(out):
        raise ExportError('the export folder %s is not empty; exports never overwrite' % out)


def compare(reference_ids, tokenizer, text, label, events, exact_required):
    """Compare the reference's first tokens with an export's answer (text from llama.cpp, or ids)."""
    ids = text if isinstance(text, list) else tokenizer(text, add_special_tokens=False)['input_ids']
    n = min(VERIFY_TOKENS, len(reference_ids))
    same = 0
    if not isinstance(text, list) and text == tokenizer.decode(reference_ids[:n]):
        same = n  # llama.cpp gives text: equal text is equal tokens, whatever a re-tokenisation gives
    else:
        for a, b in zip(reference_ids[:n], ids[:n]):
            if a != b:
                break
            same += 1
    result = {'label': label, 'same_tokens': same, 'compared_tokens': n,
              'reference': tokenizer.decode(reference_ids[:n]), 'answer': tokenizer.decode(ids[:n])}
    level = 'info' if same == n else ('error' if exact_required else 'warning')
    events('Verified %s: %d of the first %d greedy tokens equal the fine-tuned model\'s (%r vs %r)' % (
        label, same, n, result['answer'], result['reference']), level=level, verification=result)
    if exact_required and same < n:
        raise ExportError('%s does not answer as the fine-tuned model: %d of the first %d greedy tokens equal '
                          '(%r vs %r)' % (label, same, n, result['answer'], result['reference']))
    return result


def export(model_dir, out, fmt, job_dir=None, base_dir=None, convert=None, card=None, events=None):
    """Write the export of `model_dir` in `fmt` to the (new or empty) folder `out`, verify it by
    loading it back, and return the manifest (also written to OUT/export.json)."""
    events = events or Events()
    card = dict(card or {})
    if fmt not in FORMATS:
        raise ExportError('unknown format %r; use one of %s' % (fmt, ', '.join(FORMATS)))
    kind, base = describe_model(model_dir, base_dir)
    if fmt in ('hf_adapter', 'gguf_lora') and kind != 'adapter':
        raise ExportError('%s needs a LoRA adapter; %s is a whole model (use hf_merged or gguf_f16)' % (fmt, model_dir))
    if fmt.startswith('gguf'):
        convert = convert_dir(convert)
    check_writable(out)
    try:
        return _export(model_dir, out, fmt, job_dir, base_dir, base, convert, card, events)
    except BaseException:
        # Half an export is no export: remove what this run wrote (the folder was empty before).
        shutil.rmtree(out, ignore_errors=True)
        raise


def _export(model_dir, out, fmt, job_dir, base_dir, base, convert, card, events):
    started = time.time()
    events('Export %s started' % fmt, format=fmt)
    model, tokenizer = load_finetuned(model_dir, base_dir)
    messages = training_prompt(job_dir)
    if card.get('system_prompt') and messages[0]['role'] != 'system':
        messages = [{'role': 'system', 'content': card['system_prompt']}] + messages
    prompt = prompt_text(tokenizer, messages)
    reference = greedy_ids(model, tokenizer, prompt)
    events('Reference answer from the fine-tuned model: %r' % tokenizer.decode(reference))
    verification = {}
    work = tempfile.mkdtemp(prefix='.work-', dir=out)  # merged weights on the way to GGUF
    try:
        if fmt == 'hf_adapter':
            export_hf_adapter(model, tokenizer, out)
            from peft import PeftModel
            from transformers import AutoModelForCausalLM
            loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
            verification = compare(reference, tokenizer, greedy_ids(loaded, tokenizer, prompt),
                                   'the adapter folder (transformers + peft)', events, True)
        elif fmt == 'hf_merged':
            export_hf_merged(model, tokenizer, out)
            from transformers import AutoModelForCausalLM
            loaded = AutoModelForCausalLM.from_pretrained(out).eval()
            verification = compare(reference, tokenizer, greedy_ids(loaded, tokenizer, prompt),
                                   'the merged folder (transformers)', events, True)
        elif fmt in ('gguf_f16', 'gguf_q8_0', 'gguf_q4_0'):
            outtype = fmt.split('_', 1)[1]
            export_hf_merged(model, tokenizer, work)
            del model
            gguf_name = 'model-%s.gguf' % outtype
            if outtype == 'q4_0':
                f16 = convert_hf_to_gguf(work, os.path.join(work, 'model-f16.gguf'), 'f16', convert, events)
                requantize_q4_0(f16, os.path.join(out, gguf_name), convert, events)
            else:
                convert_hf_to_gguf(work, os.path.join(out, gguf_name), outtype, convert, events)
            text = gguf_greedy_text(os.path.join(out, gguf_name), prompt)
            # f16 must answer as the model does; a quantised type is reported, not required.
            verification = compare(reference, tokenizer, text, 'the GGUF %s (llama.cpp)' % outtype, events,
                                   outtype == 'f16')
            with open(os.path.join(out, MODELFILE), 'w') as f:
                f.write(modelfile(gguf_name, chat_template_text(work), card.get('system_prompt')))
        else:  # gguf_lora
            served = serving_cache([('base', base), ('lora', model_dir)])  # the versions converted here
            adapter_dir = os.path.join(work, 'adapter')
            export_hf_adapter(model, tokenizer, adapter_dir)
            del model
            convert_hf_to_gguf(base, os.path.join(out, 'base-f16.gguf'), 'f16', convert, events)
            convert_lora_to_gguf(adapter_dir, base, os.path.join(out, 'adapter-f16.gguf'), convert, events)
            text = gguf_greedy_text(os.path.join(out, 'base-f16.gguf'), prompt,
                                    lora_path=os.path.join(out, 'adapter-f16.gguf'))
            verification = compare(reference, tokenizer, text, 'the base GGUF with the LoRA GGUF (llama.cpp)',
                                   events, False)
            served([os.path.join(out, 'base-f16.gguf'), os.path.join(out, 'adapter-f16.gguf')], events)
            with open(os.path.join(out, MODELFILE), 'w') as f:
                f.write(modelfile('base-f16.gguf', chat_template_text(adapter_dir), card.get('system_prompt'),
                                  adapter_name='adapter-f16.gguf'))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    config = read_json(os.path.join(job_dir, 'config.json'), {}) if job_dir else {}
    info = dict(card, format=fmt, base_path=base, technique=card.get('technique') or config.get('technique'),
                hyperparameters=card.get('hyperparameters') or config, losses=card.get('losses') or job_losses(job_dir),
                license=base_license(base, card.get('license')),
                train_examples=count_lines(os.path.join(job_dir or '', job_files.TRAIN_FILE)),
                valid_examples=count_lines(os.path.join(job_dir or '', job_files.VALIDATION_FILE)),
                verification={'summary': '%d of the first %d greedy tokens of the export equal the fine-tuned '
                                         'model\'s on a training prompt.' % (verification['same_tokens'],
                                                                            verification['compared_tokens'])})
    with open(os.path.join(out, CARD), 'w') as f:
        f.write(model_card(info))
    files = []
    for root, _dirs, names in os.walk(out):
        for name in sorted(names):
            path = os.path.join(root, name)
            files.append({'path': os.path.relpath(path, out), 'size': os.path.getsize(path), 'sha256': sha256(path)})
    manifest = {'format': fmt, 'files': files, 'size': sum(f['size'] for f in files),
                'verification': verification, 'seconds': round(time.time() - started, 1)}
    with open(os.path.join(out, MANIFEST), 'w') as f:
        json.dump(manifest, f, indent=2)
    events('Export %s done: %d files, %.1f MB' % (fmt, len(files), manifest['size'] / 1e6), level='info',
           size=manifest['size'])
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', required=True, help='the fine-tuned model: an adapter folder or a model folder')
    parser.add_argument('--job-dir', help='the job folder: training prompt, config, metrics for the card')
    parser.add_argument('--out', required=True, help='a new (or empty) folder to write')
    parser.add_argument('--format', required=True, choices=FORMATS)
    parser.add_argument('--base', help='the base model folder (default: the adapter\'s own record of it)')
    parser.add_argument('--convert-dir', help='llama.cpp\'s converters (default $%s)' % CONVERT_DIR_ENV)
    parser.add_argument('--card', help='a JSON file of model card facts: name, base_name, license, datasets '
                                       '[{name, examples}], hyperparameters, losses, evaluation, system_prompt')
    parser.add_argument('--events', help='append events (JSON lines) to this file')
    args = parser.parse_args(argv)
    events = Events(args.events)
    try:
        manifest = export(args.model, args.out, args.format, job_dir=args.job_dir, base_dir=args.base,
                          convert=args.convert_dir, card=read_json(args.card) if args.card else None, events=events)
    except ExportError as e:
        events('Export failed: %s' % e, level='error')
        return 1
    except Exception as e:  # a load or conversion error of a library: the same event, and its traceback
        traceback.print_exc()
        events('Export failed: %s: %s' % (type(e).__name__, e), level='error')
        return 1
    print(json.dumps(manifest))
    return 0


if __name__ == '__main__':
    sys.exit(main())
