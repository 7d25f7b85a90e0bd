"""Assistant-only masking and weight 0, checked on token ids of the real SmolLM2 tokenizer."""
from trainer.data import IGNORE_INDEX, ChatCollator, tokenize_example


def learned_text(tokenizer, feature):
    return tokenizer.decode([t for t, l in zip(feature['input_ids'], feature['labels']) if l != IGNORE_INDEX])


def test_only_assistant_tokens_are_learned(tokenizer):
    example = {'messages': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
                            {'role': 'assistant', 'content': 'Hello there'}]}
    feature = tokenize_example(tokenizer, example)
    assert len(feature['input_ids']) == len(feature['labels'])
    assert feature['input_ids'] == tokenizer.apply_chat_template(example['messages'], tokenize=True, return_dict=False)
    assert learned_text(tokenizer, feature) == 'Hello there<|im_end|>\n'
    # the labels equal the ids wherever they are learned
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(feature['input_ids'], feature['labels']))


def test_weight_zero_turn_is_masked(tokenizer):
    example = {'messages': [{'role': 'user', 'content': 'Hi'},
                            {'role': 'assistant', 'content': 'Bad answer', 'weight': 0},
                            {'role': 'user', 'content': 'Again'},
                            {'role': 'assistant', 'content': 'Good answer', 'weight': 1}]}
    feature = tokenize_example(tokenizer, example)
    assert learned_text(tokenizer, feature) == 'Good answer<|im_end|>\n'


def test_collator_masks_padding_only(tokenizer):
    # pad == eos == <|im_end|> for SmolLM2: the real <|im_end|> of a reply must stay learned after padding
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids('<|im_end|>')
    short = tokenize_example(tokenizer, {'messages': [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'}]})
    long = tokenize_example(tokenizer, {'messages': [{'role': 'user', 'content': 'a longer question here'},
                                                     {'role': 'assistant', 'content': 'a longer answer here'}]})
    batch = ChatCollator(tokenizer.pad_token_id)([short, long])
    n = len(short['input_ids'])
    assert batch['input_ids'].shape[1] == len(long['input_ids'])
    assert batch['labels'][0, :n].tolist() == short['labels']
    assert (batch['labels'][0, n:] == IGNORE_INDEX).all()
    assert batch['attention_mask'][0].sum().item() == n
    end_id = tokenizer.convert_tokens_to_ids('<|im_end|>')
    assert end_id in batch['labels'][0].tolist()


def test_packed_batch_gives_the_padded_batch_loss(tokenizer, model_dir):
    """Packing changes the layout, not the maths: same loss as padding, no attention across examples."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.data import PackingCollator
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    features = [tokenize_example(tokenizer, {'messages': [{'role': 'user', 'content': q},
                                                          {'role': 'assistant', 'content': a}]})
                for q, a in (('Hi', 'Hello, how can I help?'), ('What is 2+2? Answer briefly please.', '4'))]
    with torch.no_grad():
        padded = model(**ChatCollator(tokenizer.pad_token_id)(features)).loss
        packed = model(**PackingCollator()(features)).loss
    assert torch.allclose(padded, packed, atol=1e-4), (padded, packed)

    from trainer.packed_attention import NAME  # each example's attention computed on its own
    model.set_attn_implementation(NAME)
    with torch.no_grad():
        per_example = model(**PackingCollator()(features)).loss
        padded_again = model(**ChatCollator(tokenizer.pad_token_id)(features)).loss  # falls back to sdpa
    assert torch.allclose(padded, per_example, atol=1e-4), (padded, per_example)
    assert torch.allclose(padded, padded_again, atol=1e-5)


def test_target_only_logits_give_the_same_loss(tokenizer, model_dir):
    """Padded and packed batches alike: the head applied at targets only changes nothing in the loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.data import PackingCollator
    from trainer.train import target_only_loss
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    features = [tokenize_example(tokenizer, {'messages': [{'role': 'user', 'content': q},
                                                          {'role': 'assistant', 'content': a}]})
                for q, a in (('Hi', 'Hello, how can I help?'), ('Name a colour, please.', 'Blue, like the sea.'))]
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                          LoraConfig(r=4, target_modules='all-linear', task_type='CAUSAL_LM')).eval()
    for batch in (ChatCollator(tokenizer.pad_token_id)(features), PackingCollator()(features)):
        for m in (model, lora):
            with torch.no_grad():
                full = m(**batch).loss
                targets_only = target_only_loss(m, batch)
            assert torch.allclose(full, targets_only, atol=1e-4), (full, targets_only)


def test_fast_dropout_rate_scale_and_seed():
    import torch

    from trainer.fast_dropout import FastDropout
    import numpy
    x = torch.ones(1000, 1000, requires_grad=True)
    dropout = FastDropout(0.05, numpy.random.default_rng(1)).train()
    y = dropout(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.002, dropped
    assert abs(y.mean().item() - 1.0) < 0.005  # unbiased: kept values are scaled up
    y.sum().backward()
    assert torch.equal(x.grad, y.detach()), 'the gradient goes through the same mask and scale'
    again = FastDropout(0.05, numpy.random.default_rng(1)).train()(torch.ones(1000, 1000))
    assert torch.equal(again, y.detach()), 'seeded: the same masks again'
    assert torch.equal(dropout.eval()(x), x)


def test_fast_dropout_replaces_lora_dropout(model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.fast_dropout import FastDropout, use_fast_dropout
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_dropout=0.1, target_modules='all-linear', task_type='CAUSAL_LM'))
    assert use_fast_dropout(model, seed=0) == 7 * model.config.num_hidden_layers
    assert not any(isinstance(m, torch.nn.Dropout) and m.p for m in model.modules())
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, FastDropout))
