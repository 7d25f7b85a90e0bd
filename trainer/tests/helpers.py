"""Helpers shared by the trainer tests."""
import json
import os


def write_job(folder, model_dir, n_train=24, n_valid=4, **config):
    os.makedirs(folder, exist_ok=True)
    rows = [{'messages': [{'role': 'user', 'content': 'What is the code word number %d?' % (i % 6)},
                          {'role': 'assistant', 'content': 'The code word is PINEAPPLE-%d.' % (i % 6)}]}
            for i in range(n_train + n_valid)]
    with open(os.path.join(folder, 'train.jsonl'), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows[:n_train])
    with open(os.path.join(folder, 'validation.jsonl'), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows[n_train:])
    values = {'base_model_path': model_dir, 'technique': 'lora', 'epochs': 2, 'batch_size': 4,
              'learning_rate': 1e-3, 'max_seq_length': 128, 'seed': 1}
    values.update(config)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(values, f)
    return folder


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_status(folder):
    with open(os.path.join(folder, 'status.json')) as f:
        return json.load(f)
