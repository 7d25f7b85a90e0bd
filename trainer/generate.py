"""Generate a reply with a local model (a full model folder or a LoRA adapter folder).

    python -m trainer.generate --model PATH --prompt "..." [--system "..."] [--max-new-tokens N]

Prints {"reply": "..."} as JSON on stdout; Odoo's "Test the model" calls this with a timeout.
"""
import argparse
import json
import os
import sys


def load(model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    adapter_config = os.path.join(model_path, 'adapter_config.json')
    if os.path.exists(adapter_config):
        from peft import PeftModel
        with open(adapter_config) as f:
            base_path = json.load(f)['base_model_name_or_path']
        model = AutoModelForCausalLM.from_pretrained(base_path)
        model = PeftModel.from_pretrained(model, model_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model.eval()
    return model, tokenizer


def generate(model_path, messages, max_new_tokens=128):
    import torch
    model, tokenizer = load(model_path)
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt', return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(output[0][inputs['input_ids'].shape[1]:], skip_special_tokens=True).strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True, help='model or adapter folder')
    parser.add_argument('--prompt', required=True)
    parser.add_argument('--system', default=None)
    parser.add_argument('--max-new-tokens', type=int, default=128)
    args = parser.parse_args(argv)
    messages = ([{'role': 'system', 'content': args.system}] if args.system else []) + \
        [{'role': 'user', 'content': args.prompt}]
    try:
        reply = generate(args.model, messages, args.max_new_tokens)
    except Exception as e:
        print(json.dumps({'error': '%s: %s' % (type(e).__name__, e)}))
        return 1
    print(json.dumps({'reply': reply}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
