"""The trainer on a CUDA GPU: LoRA, QLoRA (when bitsandbytes is installed) and full fine-tuning
of SmolLM2-135M, each a real `python -m trainer.train` run on a job folder, printing the device,
the precision the trainer chose, tokens/s and the first and last training loss.

    python -m bench.gpu_check --model DIR [--steps 60] [--batch-size 16]

DIR is a Hugging Face model folder. When it holds only config.json and the tokenizer (the GPU
machine has no network and the weights are too big to carry there), the weights are initialised
at random with a fixed seed: the speed is the real model's, the loss is not a fine-tuning one
(it still has to fall). Runs anywhere; on a CPU QLoRA is reported as not available.
"""
import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ('invoice order delivery refund stock price customer support warehouse product account payment '
         'shipping discount warranty contract').split()


def model_folder(source, work):
    """`source` if it has weights, else a copy with random weights of the same shape."""
    if any(name.endswith('.safetensors') for name in os.listdir(source)):
        return source, 'pretrained'
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    target = os.path.join(work, 'model')
    shutil.copytree(source, target)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    model.save_pretrained(target)
    return target, 'random weights (same shape)'


def write_data(path, n, seed=0):
    rng = random.Random(seed)
    with open(path, 'w') as f:
        for _ in range(n):
            question = ' '.join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))
            answer = ' '.join(rng.choice(WORDS) for _ in range(rng.randint(40, 160)))
            f.write(json.dumps({'messages': [{'role': 'user', 'content': question},
                                             {'role': 'assistant', 'content': answer}]}) + '\n')


def run(technique, model, work, steps, batch_size, extra=None, label=None):
    label = label or technique
    folder = os.path.join(work, label)
    os.makedirs(folder)
    write_data(os.path.join(folder, 'train.jsonl'), steps * batch_size)
    config = {'base_model_path': model, 'technique': technique, 'epochs': 1, 'batch_size': batch_size,
              'learning_rate': 2e-4 if technique != 'full' else 2e-5, 'max_steps': steps, 'max_seq_length': 512,
              'logging_steps': 5, 'save_steps': steps * 10}
    config.update(extra or {})
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(config, f)
    started = time.time()
    with open(os.path.join(folder, 'trainer.log'), 'wb') as log:
        code = subprocess.call([sys.executable, '-m', 'trainer.train', '--job-dir', folder], cwd=ROOT,
                               env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get('PYTHONPATH'))))), stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - started
    with open(os.path.join(folder, 'status.json')) as f:
        status = json.load(f)
    losses = []
    if os.path.exists(os.path.join(folder, 'metrics.jsonl')):
        with open(os.path.join(folder, 'metrics.jsonl')) as f:
            losses = [r['train_loss'] for r in map(json.loads, f) if 'train_loss' in r]
    events = []
    with open(os.path.join(folder, 'events.jsonl')) as f:
        events = [json.loads(line)['message'] for line in f]
    precision = next((e for e in events if e.startswith('precision')), '?')
    final = status.get('final_metrics') or {}
    if status.get('state') != 'completed':
        with open(os.path.join(folder, 'trainer.log'), 'rb') as f:
            tail = f.read()[-1500:].decode('utf-8', 'replace')
        return '%-5s %s (exit %d): %s\n%s' % (label, status.get('state'), code, status.get('error'), tail)
    return ('%-5s completed in %.1f s wall, %.0f tokens/s, loss %.3f -> %.3f over %d steps; %s'
            % (label, wall, final.get('tokens_per_second') or 0, losses[0] if losses else float('nan'),
               losses[-1] if losses else float('nan'), steps, precision))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True)
    parser.add_argument('--steps', type=int, default=60)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--techniques', nargs='+', default=['lora', 'qlora', 'full'])
    parser.add_argument('--extra', default='{}', help='settings added to each run\'s config (JSON)')
    args = parser.parse_args()
    import torch
    import transformers
    import peft
    cuda = torch.cuda.is_available()
    print('device: %s; torch %s, transformers %s, peft %s; host CPU %s (%s)' % (
        torch.cuda.get_device_name(0) if cuda else 'CPU only', torch.__version__, transformers.__version__,
        peft.__version__, platform.processor() or platform.machine(), os.cpu_count()))
    if cuda:
        print('bf16 supported: %s' % torch.cuda.is_bf16_supported())
    try:
        import bitsandbytes
        print('bitsandbytes %s' % bitsandbytes.__version__)
    except ImportError:
        print('bitsandbytes: not installed (QLoRA not available)')
    work = tempfile.mkdtemp(prefix='llmt-gpu-')
    model, kind = model_folder(args.model, work)
    print('model: %s (%s)' % (model, kind))
    for technique in args.techniques:
        extra = json.loads(args.extra)
        print(run(technique, model, work, args.steps, args.batch_size, extra,
                  technique + (' ' + args.extra if extra else '')), flush=True)


if __name__ == '__main__':
    main()
