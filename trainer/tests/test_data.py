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
    # pad == eos for SmolLM2: the real <|im_end|> of a reply must stay learned after padding
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids('<|im_end|>') or tokenizer.pad_token_id is not None
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


def test_target_only_logits_give_the_same_loss(tokenizer, model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.data import PackingCollator
    from trainer.train import target_only_loss
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    features = [tokenize_example(tokenizer, {'messages': [{'role': 'user', 'content': q},
                                                          {'role': 'assistant', 'content': a}]})
                for q, a in (('Hi', 'Hello, how can I help?'), ('Name a colour.', 'Blue, like the sea.'))]
    batch = PackingCollator()(features)
    with torch.no_grad():
        full = model(**batch).loss
        targets_only = target_only_loss(model, batch)
    assert torch.allclose(full, targets_only, atol=1e-4), (full, targets_only)
