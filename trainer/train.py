"""Fine-tune a causal LM on a job folder (see job_files.py): LoRA, QLoRA or full.

    python -m trainer.train --job-dir DIR [--resume]

Reads DIR/config.json, trains with transformers.Trainer (+ peft), and reports through DIR:
status.json, metrics.jsonl, events.jsonl, checkpoints/ and result/. SIGTERM (Cancel in Odoo)
saves a checkpoint at the next step end and ends with state "cancelled".

With `num_processes` N > 1 the same command becomes data-parallel training: it takes the folder
lock and execs itself into torchrun with N workers, rank 0 reporting (distributed.py).
"""
import argparse
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field, fields

from . import distributed, job_files
from .job_files import JobFolder


@dataclass
class TrainConfig:
    base_model_path: str = field(metadata={'help': 'Hugging Face model folder to start from'})
    technique: str = field(default='lora', metadata={'help': 'lora, qlora or full'})
    data_format: str = field(default='chat', metadata={'help': 'chat (loss on assistant replies) or text (continued '
                                                               'pre-training: no chat template, loss on every token)'})
    epochs: int = field(default=job_files.CONFIG_DEFAULTS['epochs'], metadata={'help': 'passes over the training data (0: the default)'})
    batch_size: int = field(default=job_files.CONFIG_DEFAULTS['batch_size'],
                            metadata={'help': 'examples per step, all processes together (0: the default)'})
    num_processes: int = field(default=1, metadata={'help': 'data-parallel training processes (torchrun): '
                                                            'one per GPU, or a share of the CPU cores each'})
    learning_rate: float = field(default=job_files.CONFIG_DEFAULTS['learning_rate'], metadata={'help': 'peak learning rate'})
    lora_r: int = field(default=job_files.CONFIG_DEFAULTS['lora_r'], metadata={'help': 'LoRA rank'})
    lora_alpha: int = field(default=job_files.CONFIG_DEFAULTS['lora_alpha'], metadata={'help': 'LoRA scaling'})
    lora_dropout: float = field(default=job_files.CONFIG_DEFAULTS['lora_dropout'], metadata={'help': 'LoRA dropout'})
    target_modules: list = field(default=None, metadata={'help': 'modules to adapt; default all linear projections'})
    max_seq_length: int = field(default=job_files.CONFIG_DEFAULTS['max_seq_length'], metadata={'help': 'longer examples are cut (and reported)'})
    seed: int = field(default=job_files.CONFIG_DEFAULTS['seed'], metadata={'help': 'random seed'})
    gradient_accumulation_steps: int = field(default=1, metadata={'help': 'steps before an update'})
    warmup_ratio: float = field(default=0.0, metadata={'help': 'share of steps warming up the LR'})
    warmup_steps: int = field(default=0, metadata={'help': 'steps warming up the LR (wins over warmup_ratio)'})
    max_grad_norm: float = field(default=1.0, metadata={'help': 'gradient clipping norm'})
    weight_decay: float = field(default=0.0, metadata={'help': 'AdamW weight decay'})
    lr_scheduler_type: str = field(default='linear', metadata={'help': 'transformers scheduler name'})
    logging_steps: int = field(default=1, metadata={'help': 'steps between metric records'})
    eval_steps: int = field(default=0, metadata={'help': 'steps between evaluations (0: once an epoch)'})
    save_steps: int = field(default=0, metadata={'help': 'steps between checkpoints (0: once an epoch)'})
    max_steps: int = field(default=0, metadata={'help': 'stop after this many steps (0: epochs decide)'})
    bf16: bool = field(default=None, metadata={'help': 'force bf16 (true) or fp32 (false); default: measured '
                                                       'on this machine (CPU: tuning.py, CUDA: precision.py); CUDA: autocast, CPU '
                                                       'LoRA: frozen weights only (bf16_matmul)'})
    # Random batches, as plain Trainer: length-grouped ones weigh short examples' tokens more and
    # cost final loss on the benchmark; packing removes the padding that grouping would save.
    group_by_length: bool = field(default=False, metadata={'help': 'batch similar lengths (padded batches)'})
    # Packing's per-example attention pays on a CPU; on CUDA padded batches were 3.5x faster
    # (H100, SmolLM2-135M LoRA: 5847 vs 1647 tokens/s, same loss), so the default follows the device.
    packing: bool = field(default=None, metadata={'help': 'padding-free batches (examples end to end); '
                                                          'default: on CPU, off on CUDA'})
    merge_adapter: bool = field(default=False, metadata={'help': 'also save base + adapter merged'})
    resume: bool = field(default=False, metadata={'help': 'continue from the last checkpoint'})

    @classmethod
    def from_dict(cls, values):
        """The config, refusing keys it does not know: a setting silently dropped is a setting
        the user thinks was applied."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError('unknown setting(s) %s in config.json; known: %s' % (', '.join(unknown), ', '.join(sorted(known))))
        return cls(**{k: v for k, v in values.items() if v is not None})


class TrainingCancelled(Exception):
    pass


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--job-dir', required=True, help='the job folder (config.json, train.jsonl, ...)')
    parser.add_argument('--resume', action='store_true', help='continue from the last checkpoint')
    return parser


def cuda_available():
    import torch
    return torch.cuda.is_available()


def check_technique(config):
    """Refuse what cannot run here, with a message a person can act on. Never fall back silently."""
    if config.technique not in ('lora', 'qlora', 'full'):
        raise ValueError('unknown technique %r; use lora, qlora or full' % config.technique)
    if config.data_format not in ('chat', 'text'):
        raise ValueError("unknown data_format %r; the trainer trains 'chat' or 'text'" % config.data_format)
    if config.technique == 'qlora':
        if not cuda_available():
            raise RuntimeError('QLoRA needs a CUDA GPU and none is available on this machine; '
                               'use LoRA or full fine-tuning here, or run the trainer on a GPU host')
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise RuntimeError('QLoRA needs the bitsandbytes package in the trainer environment '
                               '(pip install bitsandbytes)')


def load_model(config):
    import torch
    from transformers import AutoModelForCausalLM
    kwargs = {'dtype': torch.float32}
    if config.technique == 'qlora':
        from transformers import BitsAndBytesConfig
        kwargs = {'quantization_config': BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16), 'device_map': {'': distributed.local_rank()}}
    model = AutoModelForCausalLM.from_pretrained(config.base_model_path, **kwargs)
    model.config.use_cache = False  # training needs no KV cache (and packed batches must not have one)
    peft_config = make_lora_config(config)
    if peft_config is not None:
        from peft import get_peft_model, prepare_model_for_kbit_training
        if config.technique == 'qlora':
            model = prepare_model_for_kbit_training(model)
        model = get_peft_model(model, peft_config)
        if not torch.cuda.is_available():
            from .fast_dropout import use_fast_dropout
            use_fast_dropout(model, config.seed + distributed.rank())  # each rank its own masks
    return model


def make_lora_config(config):
    """A peft LoraConfig for lora/qlora, None for full fine-tuning."""
    if config.technique == 'full':
        return None
    from peft import LoraConfig
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.target_modules or 'all-linear', task_type='CAUSAL_LM')


def choose_precision(folder, config, model, threads):
    """bf16 or fp32 for this run, measured on this machine (precision.py), reported as an event.
    Rank 0 decides for all the processes (one precision for all of them)."""
    import torch

    from . import precision
    choice = None
    if distributed.rank() == 0:
        cuda = torch.cuda.is_available()
        lora = config.technique != 'full'
        choice = precision.choose(folder.path, config.bf16, cuda, cuda and torch.cuda.is_bf16_supported(),
                                  lambda: precision.layer_shapes(model, lora), 'lora' if lora else 'full',
                                  resume=config.resume, threads=threads)
        folder.event(precision.describe(choice), **{k: v for k, v in choice.items() if k != 'source'})
    return distributed.broadcast(choice)


SCREEN_TOKENS = 32  # tokens of the tiny step that screens out a pathologically slow precision
# Jobs with fewer training steps keep the start-up probe (see main). Several processes measure on
# about five discarded steps; one process measures on its first training steps (about ten, kept),
# which costs only the screening and the slower candidates' extra time.
TUNE_MIN_STEPS = 60
TUNE_MIN_STEPS_ONE_PROCESS = 30


def tuning_choices(config, threads, single_process):
    """(precisions, thread counts) the controller may choose between on CPU: a forced precision
    alone; threads: all of this process's cores or one less (one process), its share (several)."""
    from . import tuning
    precisions = [('bf16' if config.bf16 else 'fp32')] if config.bf16 is not None else list(tuning.PRECISIONS)
    return precisions, (tuning.thread_options(threads) if single_process else [threads])


class DiscardedSteps(object):
    """Steps whose updates are thrown away: the trainable weights' gradients and every random state
    the step draws from (torch's, the LoRA dropout's numpy generator) are put back as they were, so
    training after a measurement is the one it would have been without it."""

    def __init__(self, model):
        import torch
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.rngs = {id(m.rng): m.rng for m in model.modules() if hasattr(m, 'rng') and hasattr(m.rng, 'bit_generator')}
        self.torch_rng = torch.random.fork_rng(devices=[])

    def __enter__(self):
        self.grads = [p.grad for p in self.params]
        for p in self.params:  # a backward would add into the kept tensors in place
            p.grad = None
        self.rng_states = {k: rng.bit_generator.state for k, rng in self.rngs.items()}
        self.torch_rng.__enter__()
        self.training = self.model.training
        self.model.train()
        return self

    def __exit__(self, *exc):
        for p, grad in zip(self.params, self.grads):
            p.grad = grad
        for k, rng in self.rngs.items():
            rng.bit_generator.state = self.rng_states[k]
        self.model.train(self.training)
        return self.torch_rng.__exit__(*exc)


def make_step_timers(model, switch, full):
    """(step_timer, screen_timer) for tuning.Controller, on a batch given later (`timers.batch`):
    forward + backward of the training loss on the real model, in the candidate's precision and
    threads; the caller wraps them in DiscardedSteps."""
    import torch

    def run(batch, precision):
        switch['bf16'] = precision == 'bf16'
        for p in model.parameters():
            p.grad = None
        start = time.perf_counter()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=full and switch['bf16']):
            loss = target_only_loss(model, batch)
        loss.backward()
        return time.perf_counter() - start

    def step_timer(candidate):
        precision, threads = candidate
        torch.set_num_threads(threads)
        return run(timers.batch, precision)

    def screen_timer(candidate):
        precision, threads = candidate
        torch.set_num_threads(threads)
        tiny = {k: (v[:1, :SCREEN_TOKENS] if torch.is_tensor(v) and v.dim() == 2 else v) for k, v in timers.batch.items()}
        tiny['labels'] = tiny['input_ids'].clone()  # every token a target: a whole step, however small
        return run(tiny, precision)

    class timers(object):
        batch = None
    timers.step, timers.screen = step_timer, screen_timer
    return timers


class Tuning(object):
    """The trainer's side of tuning.Controller on CPU: measures on a real batch, applies the choice
    (threads, the bf16 switch), writes the precision event and the job folder's record; the trainer
    class reports each step to it and it measures again when the controller asks."""

    def __init__(self, folder, model, switch, full, precisions, threads, report):
        import torch

        from . import tuning
        self.folder, self.model, self.switch, self.report = folder, model, switch, report
        self.timers = make_step_timers(model, switch, full)

        def apply(candidate):
            switch['bf16'] = candidate[0] == 'bf16'
            torch.set_num_threads(candidate[1])
        self.controller = tuning.Controller(self.timers.step, apply, precisions, threads, screen_timer=self.timers.screen)
        self.record = None
        self.seconds = 0.0  # all measurements together

    def tune(self, batch, reason):
        """Measures now, on discarded steps of `batch` (several processes: rank 0 measures, all
        apply its choice from the first step)."""
        self.timers.batch = {k: v for k, v in batch.items()}
        with DiscardedSteps(self.model):
            record = self.controller.tune(reason)
        self.timers.batch = None
        self._report(record, 'measured on training steps of this job (%s; discarded) in %.1f s'
                     % (reason, record['measure_seconds']))
        return record

    def start(self, batch, reason):
        """One process: screens on tiny discarded steps of `batch`, then measures on the coming
        training steps themselves (observe)."""
        self.timers.batch = {k: v for k, v in batch.items()}
        with DiscardedSteps(self.model):
            self.controller.start(reason)
        self.timers.batch = None

    def current(self):
        """(precision, threads) in force: the choice, or the candidate being measured."""
        return self.controller.choice or self.controller._candidate

    def _report(self, record, source):
        from . import tuning
        self.seconds += record['measure_seconds']
        self.record = record
        if self.report:
            self.folder.event(tuning.describe(record, source), **record)
            if self.folder.writes:
                job_files.write_json_atomic(self.folder.file(TUNING_RECORD), record)

    def observe(self, seconds, batch):
        tokens = int(batch['input_ids'].numel())
        if self.controller.measuring:
            record = self.controller.measured(seconds, tokens)
            if record:
                self._report(record, 'measured on %d training steps of this job (%s), %d tokens each on '
                             'average; cost %.1f s' % (record['measured_steps'], record['reason'],
                                                        record['step_tokens'], record['measure_seconds']))
            return
        reason = self.controller.observe(seconds, tokens)
        if reason:
            self.start(batch, reason)


TUNING_RECORD = 'precision.json'


class ListDataset(object):
    def __init__(self, features):
        self.features = features

    def __len__(self):
        return len(self.features)

    def __getitem__(self, index):
        return self.features[index]


def make_progress_callback(folder, cancel_flag, n_train_tokens, device):
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """Reports every log and step to the job folder; honours Cancel between steps, at the same
        step on every rank (`cancelled`: the stop they agreed on)."""

        def __init__(self):
            self.started = None
            self.start_step = 0
            self.start_epoch = 0.0
            self.cancelled = False

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.time()
            self.start_step = state.global_step
            self.start_epoch = state.epoch or 0.0
            folder.update_status(state='running', total_steps=state.max_steps, step=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            # Every rank, every step: the collective save and stop must happen on all or none.
            if distributed.any_rank(cancel_flag['set'] or distributed.launcher_cancelled(), device):
                self.cancelled = True
                control.should_save = True
                control.should_training_stop = True
                folder.event('Cancel received: saving a checkpoint at step %d and stopping' % state.global_step,
                             level='warning')
            if not state.is_world_process_zero:
                return
            done = state.global_step - self.start_step
            elapsed = time.time() - self.started
            remaining = (state.max_steps - state.global_step) * elapsed / done if done else None
            folder.update_status(state='running', step=state.global_step, total_steps=state.max_steps,
                                 epoch=state.epoch or 0.0, progress=100.0 * state.global_step / max(state.max_steps, 1),
                                 eta=time.time() + remaining if remaining is not None else None,
                                 tokens_seen=int(n_train_tokens * (state.epoch or 0.0)))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            elapsed = time.time() - self.started if self.started else 0
            record = {'step': state.global_step, 'epoch': round(state.epoch or 0.0, 4)}
            mapping = {'loss': 'train_loss', 'learning_rate': 'learning_rate', 'eval_loss': 'valid_loss',
                       'eval_token_accuracy': 'valid_token_accuracy'}
            for key, name in mapping.items():
                if key in logs:
                    record[name] = logs[key]
            if 'loss' in logs and elapsed:
                epochs_done = (state.epoch or 0.0) - self.start_epoch
                record['tokens_per_second'] = round(n_train_tokens * epochs_done / elapsed, 1)
            if len(record) > 2:
                folder.metric(record)

    return ProgressCallback()


def make_trainer_class(tuning=None, cpu_autocast=None):
    """`tuning`: a Tuning that every training step reports to (its time, its batch), which may
    measure again between steps; `cpu_autocast`: the switch ({'bf16': bool}) of bf16 autocast for
    full fine-tuning on CPU, flipped by the tuning (TrainingArguments' bf16 is fixed for the run)."""
    import contextlib

    import torch
    from transformers import Trainer

    def precision_context():
        if cpu_autocast is None:
            return contextlib.nullcontext()
        return torch.autocast('cpu', dtype=torch.bfloat16, enabled=cpu_autocast['bf16'])

    class TargetLogitsTrainer(Trainer):
        """In training, apply the LM head only where a token is predicted.

        The head (vocabulary x hidden) is a large share of a small model's FLOPs, and prompt and
        padding tokens are never targets; the loss is the same mean over the same target tokens."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or not model.training:
                with precision_context():
                    return super(TargetLogitsTrainer, self).compute_loss(
                        model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            with self.accelerator.autocast(), precision_context():  # where accelerate's wrapper does not already
                loss = target_only_loss(model, inputs, num_items_in_batch)
            # As Trainer.compute_loss: with several processes num_items_in_batch counts all of their
            # targets, and DDP averages the gradients over the processes, so scale back up.
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            with precision_context():
                return super(TargetLogitsTrainer, self).prediction_step(model, inputs, prediction_loss_only,
                                                                        ignore_keys=ignore_keys)

        def training_step(self, model, inputs, num_items_in_batch=None):
            if tuning is None:
                return super(TargetLogitsTrainer, self).training_step(model, inputs, num_items_in_batch)
            start = time.perf_counter()
            loss = super(TargetLogitsTrainer, self).training_step(model, inputs, num_items_in_batch)
            tuning.observe(time.perf_counter() - start, inputs)  # may measure again, on this batch
            return loss

    return TargetLogitsTrainer


def target_only_loss(model, inputs, num_items_in_batch=None):
    """Causal-LM loss with logits only at predicting positions (padded or packed batches).

    Through the model's own forward (the head applied where `logits_to_keep` is true), not its
    decoder and head separately: under DDP, the wrapper's forward is what syncs the gradients."""
    import torch
    import torch.nn.functional as F
    labels = inputs['labels']
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100  # position t predicts token t + 1
    model_inputs = {k: v for k, v in inputs.items() if k != 'labels'}
    logits = model(**model_inputs, logits_to_keep=keep).logits.float()  # [targets, vocabulary]
    loss = F.cross_entropy(logits, labels[:, 1:][keep[:, :-1]], reduction='sum')
    return loss / (num_items_in_batch if num_items_in_batch is not None else max(int(keep.sum()), 1))


def token_accuracy_metrics():
    def preprocess(logits, labels):
        return logits.argmax(dim=-1)

    def compute(eval_pred):
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        predictions, labels = predictions[:, :-1], labels[:, 1:]  # token t predicts t+1
        mask = labels != -100
        return {'token_accuracy': float((predictions[mask] == labels[mask]).mean()) if mask.any() else 0.0}

    return preprocess, compute


def last_checkpoint(checkpoints_dir):
    """The newest complete checkpoint, or None. Trainer writes trainer_state.json last: a folder
    without it was being saved when the trainer was killed (a lost node, an OOM) and cannot be
    resumed from, so the one before it is used (rotation deletes that one only after a save ends)."""
    if not os.path.isdir(checkpoints_dir):
        return None
    complete = [name for name in os.listdir(checkpoints_dir) if name.startswith('checkpoint-')
                and name[len('checkpoint-'):].isdigit()
                and os.path.isfile(os.path.join(checkpoints_dir, name, 'trainer_state.json'))]
    if not complete:
        return None
    return os.path.join(checkpoints_dir, max(complete, key=lambda name: int(name[len('checkpoint-'):])))


CANCEL = {'set': False}  # set by SIGTERM; the progress callback stops at the next step end


def train(folder, config):
    import torch
    from transformers import AutoTokenizer, TrainingArguments

    from .data import ChatCollator, PackingCollator, tokenize_file

    check_technique(config)
    cuda = torch.cuda.is_available()
    if config.packing is None:
        config.packing = not cuda
    processes = distributed.world_size()
    per_process_batch = distributed.per_process_batch(config.batch_size or job_files.CONFIG_DEFAULTS['batch_size'], processes)
    if cuda and processes > torch.cuda.device_count():  # NCCL refuses two processes on one GPU
        raise RuntimeError('num_processes %d needs a GPU per process; this machine has %d'
                           % (processes, torch.cuda.device_count()))
    distributed.init(cuda)
    torch.manual_seed(config.seed)
    threads = distributed.threads_per_process()  # the cores this process may use, not the host's
    if not cuda:
        torch.set_num_threads(threads)
    folder.update_status(state='starting')
    tokenizer = AutoTokenizer.from_pretrained(config.base_model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_features, too_long, empty = tokenize_file(tokenizer, folder.file(job_files.TRAIN_FILE), config.max_seq_length,
                                                    config.data_format)
    if too_long:
        folder.event('%d training example(s) longer than max_seq_length=%d were %s: %s'
                     % (len(too_long), config.max_seq_length,
                        'split into pieces' if config.data_format == 'text' else 'cut',
                        ', '.join('line %d (%d tokens)' % item for item in too_long[:20])), level='warning')
    if empty:
        folder.event('%d example(s) have nothing to learn (weight 0 or reply cut off) and were left out: lines %s'
                     % (len(empty), ', '.join(str(n) for n in empty[:20])), level='warning')
    if not train_features:
        raise RuntimeError('no training example is left to learn from')
    eval_features = []
    validation_path = folder.file(job_files.VALIDATION_FILE)
    if os.path.exists(validation_path) and os.path.getsize(validation_path):
        eval_features, _long, _empty = tokenize_file(tokenizer, validation_path, config.max_seq_length,
                                                     config.data_format)
    n_train_tokens = sum(len(f['input_ids']) for f in train_features)  # real tokens, no padding

    model = load_model(config)
    if config.packing:  # before the tuning: its steps must be the training's own
        from .packed_attention import NAME
        model.set_attn_implementation(NAME)
    collator = PackingCollator() if config.packing else ChatCollator(tokenizer.pad_token_id)
    started = time.time()  # the measurements count in the run's time (and its tokens/s)
    tuning, cpu_autocast = None, None
    if cuda:
        choice = choose_precision(folder, config, model, threads)
        bf16 = choice['precision'] == 'bf16'
    else:
        # One controller (tuning.py) for precision and threads, on real steps of this job's batch.
        full = config.technique == 'full'
        switch = {'bf16': False}
        if full:
            cpu_autocast = switch
        else:
            from .bf16_matmul import use_bf16_matmuls
            use_bf16_matmuls(model, switch)
        epochs = config.epochs or job_files.CONFIG_DEFAULTS['epochs']
        steps = math.ceil(len(train_features) / float(per_process_batch * processes)) * epochs
        if config.max_steps:
            steps = min(steps, config.max_steps * config.gradient_accumulation_steps)
        if steps < (TUNE_MIN_STEPS if processes > 1 else TUNE_MIN_STEPS_ONE_PROCESS):
            # A short job cannot repay the measurement and keeps the start-up probe (precision.py);
            # every longer one is tuned on its own steps.
            choice = choose_precision(folder, config, model, threads)
            switch['bf16'] = choice['precision'] == 'bf16'
        else:
            precisions, thread_counts = tuning_choices(config, threads, processes == 1)
            if processes > 1 and distributed.rank() != 0:
                precisions = []  # rank 0 measures, the others wait for its choice
            tuning = Tuning(folder, model, switch, full, precisions, thread_counts, report=distributed.rank() == 0)
            first_batch = collator(train_features[:per_process_batch])
            if processes > 1:
                record = tuning.tune(first_batch, 'start') if precisions else None
                record = distributed.broadcast(record)
                switch['bf16'] = record['precision'] == 'bf16'
                tuning = None  # all ranks compute alike: no rank revises its choice alone
                choice = {'precision': record['precision'], 'threads': record['threads']}
            else:
                tuning.start(first_batch, 'start')  # the choice is made on the first training steps
                choice = dict(zip(('precision', 'threads'), tuning.current()))
        bf16 = False  # TrainingArguments' autocast: off on CPU, the switch does it
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    folder.event('Loaded %s (%s): %.1fM parameters, %.2fM trainable; %d training, %d validation examples'
                 % (os.path.basename(config.base_model_path.rstrip('/')), config.technique, total / 1e6,
                    trainable / 1e6, len(train_features), len(eval_features)))
    if processes > 1:
        folder.event('Data parallel: %d processes (%s), %d examples each per step%s'
                     % (processes, 'nccl' if cuda else 'gloo', per_process_batch,
                        '' if cuda else ', %d CPU thread(s) each' % threads))

    autocast_bf16 = bf16  # CUDA only: on CPU the tuning's switch does it
    preprocess, compute = token_accuracy_metrics()
    progress = make_progress_callback(folder, CANCEL, n_train_tokens, distributed.device(cuda))
    args = TrainingArguments(
        output_dir=folder.file(job_files.CHECKPOINTS),
        num_train_epochs=config.epochs or job_files.CONFIG_DEFAULTS['epochs'],
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=per_process_batch,
        per_device_eval_batch_size=per_process_batch,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        # transformers 5: an int counts steps, a float below 1 is a ratio
        warmup_steps=config.warmup_steps or float(config.warmup_ratio),
        max_grad_norm=config.max_grad_norm,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        eval_strategy=('steps' if config.eval_steps else 'epoch') if eval_features else 'no',
        eval_steps=config.eval_steps or None,
        save_strategy='steps' if config.save_steps else 'epoch',
        save_steps=config.save_steps or 500,
        save_total_limit=2,
        bf16=autocast_bf16,
        use_cpu=not cuda,
        ddp_backend=('nccl' if cuda else 'gloo') if processes > 1 else None,
        ddp_find_unused_parameters=False,  # every trainable weight is used: skip DDP's graph search
        seed=config.seed,
        report_to='none',
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        train_sampling_strategy='group_by_length' if config.group_by_length else 'random')
    trainer = make_trainer_class(tuning, cpu_autocast)(model=model, args=args, train_dataset=ListDataset(train_features),
                      eval_dataset=ListDataset(eval_features) if eval_features else None,
                      data_collator=collator,
                      compute_metrics=compute if eval_features else None,
                      preprocess_logits_for_metrics=preprocess if eval_features else None,
                      callbacks=[progress])
    resume_from = last_checkpoint(folder.file(job_files.CHECKPOINTS)) if config.resume else None
    if resume_from:
        folder.event('Resuming from %s' % os.path.basename(resume_from))
    output = trainer.train(resume_from_checkpoint=resume_from)
    if progress.cancelled:  # agreed by all ranks; a SIGTERM after the last step end is too late
        trainer.save_state()
        raise TrainingCancelled()

    runtime = time.time() - started
    # This run's training speed on this machine: Odoo keeps it to estimate later jobs' time.
    tokens_run = n_train_tokens * ((trainer.state.epoch or 0.0) - progress.start_epoch)
    if tuning is not None:  # the last choice, the one training ended in
        choice = dict(zip(('precision', 'threads'), tuning.current()))
    final = {'train_loss': output.training_loss, 'train_runtime': runtime, 'precision': choice['precision'],
             'threads': choice['threads'], 'tuning_seconds': round(tuning.seconds, 2) if tuning else 0.0,
             'tuning_measurements': tuning.controller.measurements if tuning else 0, 'tokens_per_second': round(tokens_run / runtime, 1) if runtime else None}
    if eval_features:
        metrics = trainer.evaluate()
        final['valid_loss'] = metrics.get('eval_loss')
        final['valid_token_accuracy'] = metrics.get('eval_token_accuracy')
        if final['valid_loss'] is not None:
            final['perplexity'] = math.exp(min(final['valid_loss'], 50))
    result_dir = folder.file(job_files.RESULT)
    trainer.save_model(result_dir)  # Trainer writes on rank 0 only (as save_metrics and save_state)
    trainer.save_metrics('all', final)
    trainer.save_state()
    if distributed.rank() != 0:
        return final, result_dir
    tokenizer.save_pretrained(result_dir)
    if config.merge_adapter and config.technique == 'lora':
        merged = model.merge_and_unload()
        merged.save_pretrained(os.path.join(result_dir, 'merged'))
        tokenizer.save_pretrained(os.path.join(result_dir, 'merged'))
    folder.event('Training finished: train loss %.4f%s' % (
        final['train_loss'], ', validation loss %.4f' % final['valid_loss'] if final.get('valid_loss') is not None else ''))
    return final, result_dir


def hold_folder_lock(folder):
    """Hold the job folder's trainer lock for this process's life (kept through the exec into
    torchrun), or None when another trainer holds it: two trainers must never write one folder."""
    import fcntl
    lock = open(folder.file(job_files.TRAINER_LOCK), 'w')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def main(argv=None):
    args = make_parser().parse_args(argv)
    folder = JobFolder(os.path.abspath(args.job_dir))
    worker = distributed.is_worker()
    lock = None if worker else hold_folder_lock(folder)  # a worker's launcher holds it
    if lock is None and not worker:
        # Not a failure of the job: the trainer that holds the folder goes on and reports.
        print('another trainer holds %s; this one exits without touching the job' % folder.path, file=sys.stderr)
        return 3

    def on_sigterm(signum, frame):
        # Installed first thing: a Cancel during start-up still ends as "cancelled", not killed.
        CANCEL['set'] = True

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # a worker inherits it blocked
    try:
        raw = folder.read_config()
        if args.resume:
            raw['resume'] = True
        config = TrainConfig.from_dict(raw)
        if config.num_processes > 1 and not worker:
            distributed.per_process_batch(config.batch_size or job_files.CONFIG_DEFAULTS['batch_size'],
                                           config.num_processes)  # before starting them
            distributed.block_sigterm()  # from here on a Cancel waits, pending, for the workers
            if CANCEL['set']:
                raise TrainingCancelled()
            distributed.exec_torchrun(folder.path, config.num_processes, lock, ['--resume'] if args.resume else [])
        final, result_dir = train(folder, config)
        folder.update_status(state='completed', progress=100.0, final_metrics=final,
                             result={'model_ref': result_dir, 'technique': config.technique,
                                     'adapter': config.technique != 'full',
                                     'base_model_path': config.base_model_path})
        return 0
    except TrainingCancelled:
        folder.update_status(state='cancelled')
        folder.event('Training cancelled; the last checkpoint is kept for a resume', level='warning')
        return 0
    except Exception as e:
        traceback.print_exc()
        folder.update_status(state='failed', error='%s: %s' % (type(e).__name__, e))
        folder.event('Training failed: %s' % e, level='error')
        return 1
    finally:
        if worker:
            distributed.finish()


if __name__ == '__main__':
    sys.exit(main())
