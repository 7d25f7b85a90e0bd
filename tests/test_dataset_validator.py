"""The validator as a plain function: each bad input is reported with its line and reason."""
import io
import json
import unittest

from odoo.addons.llm_training.lib.datasets.dataset_validator import (DatasetValidator, estimate_tokens,
                                                                     validate_files)

GOOD = {'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]}


def good_lines(n=10):
    return [json.dumps({'messages': [{'role': 'user', 'content': 'Q%d' % i},
                                     {'role': 'assistant', 'content': 'A%d' % i}]}).encode() for i in range(n)]


def validate(raw_lines, **options):
    data = b''.join(line + b'\n' for line in raw_lines)
    return validate_files([('data.jsonl', io.BytesIO(data))], **options)


class TestBadInput(unittest.TestCase):
    """Each case: ten good examples, then one bad line 11; the error must name line 11 and say why."""

    def assertBadLine(self, bad, expected_reason, expected_field=None, raw=False):
        line = bad if raw else json.dumps(bad).encode('utf-8')
        report = validate(good_lines() + [line])
        self.assertFalse(report.valid)
        self.assertEqual(report.error_count, 1, [str(p) for p in report.errors])
        problem = report.errors[0]
        self.assertEqual((problem.file, problem.line), ('data.jsonl', 11))
        self.assertIn(expected_reason, problem.message)
        if expected_field is not None:
            self.assertEqual(problem.field, expected_field)
        self.assertIn('data.jsonl:11', report.as_text())
        self.assertEqual(report.examples, 10)  # the good lines still count

    def test_malformed_json(self):
        self.assertBadLine(b'{"messages": [', 'malformed JSON', raw=True)

    def test_trailing_garbage(self):
        self.assertBadLine(json.dumps(GOOD).encode() + b' x', 'malformed JSON', raw=True)

    def test_empty_line(self):
        self.assertBadLine(b'', 'empty line', raw=True)

    def test_whitespace_line(self):
        self.assertBadLine(b'   \t', 'empty line', raw=True)

    def test_not_utf8(self):
        self.assertBadLine(b'{"messages": "caf\xe9"}', 'not valid UTF-8', raw=True)

    def test_line_is_a_list(self):
        self.assertBadLine([GOOD], 'the line is a list', '')

    def test_line_is_a_string(self):
        self.assertBadLine('hello', 'the line is a string', '')

    def test_missing_messages(self):
        self.assertBadLine({'tools': []}, 'missing', 'messages')

    def test_unknown_top_level_key(self):
        self.assertBadLine(dict(GOOD, prompt='x'), "unknown key 'prompt'", 'prompt')

    def test_messages_not_a_list(self):
        self.assertBadLine({'messages': {'role': 'user'}}, 'is an object; it must be a list', 'messages')

    def test_messages_empty(self):
        self.assertBadLine({'messages': []}, 'is empty', 'messages')

    def test_message_not_an_object(self):
        self.assertBadLine({'messages': ['hi', GOOD['messages'][1]]}, 'is a string', 'messages[0]')

    def test_missing_role(self):
        self.assertBadLine({'messages': [{'content': 'x'}, GOOD['messages'][1]]}, 'missing', 'messages[0].role')

    def test_unknown_role(self):
        self.assertBadLine({'messages': [{'role': 'bot', 'content': 'x'}, GOOD['messages'][0]]},
                           "unknown role 'bot'", 'messages[0].role')

    def test_unknown_message_key(self):
        self.assertBadLine({'messages': [{'role': 'user', 'content': 'x', 'lang': 'en'}, GOOD['messages'][1]]},
                           'unknown key', 'messages[0].lang')

    def test_missing_content(self):
        self.assertBadLine({'messages': [{'role': 'user'}, GOOD['messages'][1]]}, 'missing', 'messages[0].content')

    def test_content_wrong_type(self):
        self.assertBadLine({'messages': [{'role': 'user', 'content': 42}, GOOD['messages'][1]]},
                           'is a number', 'messages[0].content')

    def test_empty_user_content(self):
        self.assertBadLine({'messages': [{'role': 'user', 'content': ' '}, GOOD['messages'][1]]},
                           'is empty', 'messages[0].content')

    def test_bad_content_part(self):
        self.assertBadLine({'messages': [{'role': 'user', 'content': [{'type': 'audio'}]}, GOOD['messages'][1]]},
                           'content part', 'messages[0].content[0]')

    def test_no_assistant(self):
        self.assertBadLine({'messages': [{'role': 'user', 'content': 'x'}]}, 'no assistant message', 'messages')

    def test_no_user(self):
        self.assertBadLine({'messages': [{'role': 'system', 'content': 's'}, {'role': 'assistant', 'content': 'a'}]},
                           'no user message', 'messages')

    def test_weight_not_binary(self):
        msgs = [GOOD['messages'][0], dict(GOOD['messages'][1], weight=0.5)]
        self.assertBadLine({'messages': msgs}, 'must be 0', 'messages[1].weight')

    def test_weight_boolean(self):
        msgs = [GOOD['messages'][0], dict(GOOD['messages'][1], weight=True)]
        self.assertBadLine({'messages': msgs}, 'must be 0', 'messages[1].weight')

    def test_weight_on_user(self):
        msgs = [dict(GOOD['messages'][0], weight=1), GOOD['messages'][1]]
        self.assertBadLine({'messages': msgs}, 'only assistant', 'messages[0].weight')

    def test_tool_calls_on_user(self):
        msgs = [dict(GOOD['messages'][0], tool_calls=[]), GOOD['messages'][1]]
        self.assertBadLine({'messages': msgs}, 'only assistant messages may call tools', 'messages[0].tool_calls')

    def test_tool_call_arguments_not_string(self):
        call = {'id': 'c1', 'type': 'function', 'function': {'name': 'f', 'arguments': {'a': 1}}}
        msgs = [GOOD['messages'][0], {'role': 'assistant', 'tool_calls': [call]}]
        self.assertBadLine({'messages': msgs}, 'JSON-encoded string', 'messages[1].tool_calls[0].function.arguments')

    def test_tool_message_without_call_id(self):
        msgs = GOOD['messages'] + [{'role': 'tool', 'content': '42'}]
        self.assertBadLine({'messages': msgs}, 'which tool call', 'messages[2].tool_call_id')

    def test_tools_not_a_list(self):
        self.assertBadLine(dict(GOOD, tools={'name': 'f'}), 'list of tool definitions', 'tools')

    def test_over_context_length(self):
        long = {'messages': [{'role': 'user', 'content': 'word ' * 400}, GOOD['messages'][1]]}
        report = validate(good_lines() + [json.dumps(long).encode()], max_tokens=100)
        self.assertEqual(report.errors[0].line, 11)
        self.assertIn("over the model's context of 100 tokens", report.errors[0].message)


class TestFileLevelProblems(unittest.TestCase):

    def test_bom(self):
        report = validate([b'\xef\xbb\xbf' + good_lines(1)[0]] + good_lines(10))
        self.assertEqual([(p.line, 'byte-order mark' in p.message) for p in report.errors], [(1, True)])
        self.assertEqual(report.examples, 11)  # the BOM is reported, the line still parsed

    def test_crlf_reported_once(self):
        data = b''.join(line + b'\r\n' for line in good_lines(12))
        report = validate_files([('win.jsonl', io.BytesIO(data))])
        self.assertEqual(report.error_count, 1)
        self.assertEqual((report.errors[0].file, report.errors[0].line), ('win.jsonl', 1))
        self.assertIn('CRLF', report.errors[0].message)
        self.assertEqual(report.examples, 12)

    def test_too_few_examples(self):
        report = validate(good_lines(9))
        self.assertFalse(report.valid)
        self.assertIn('only 9 valid example(s); fine-tuning needs at least 10', report.errors[0].message)

    def test_minimum_counts_across_files(self):
        a = b''.join(l + b'\n' for l in good_lines(5))
        b = b''.join(l + b'\n' for l in good_lines(10)[5:])
        report = validate_files([('a.jsonl', io.BytesIO(a)), ('b.jsonl', io.BytesIO(b))])
        self.assertTrue(report.valid, report.as_text())
        self.assertEqual(report.examples, 10)

    def test_errors_name_their_file(self):
        a = b''.join(l + b'\n' for l in good_lines(10))
        report = validate_files([('a.jsonl', io.BytesIO(a)), ('b.jsonl', io.BytesIO(b'nope\n'))])
        self.assertEqual((report.errors[0].file, report.errors[0].line), ('b.jsonl', 1))

    def test_many_errors_are_counted_but_capped(self):
        report = validate(good_lines(10) + [b'{'] * 500)
        self.assertEqual(report.error_count, 500)
        self.assertEqual(len(report.errors), 200)
        self.assertIn('and 300 more', report.as_text())


class TestWarningsAndStatistics(unittest.TestCase):

    def test_valid_file(self):
        report = validate(good_lines(12))
        self.assertTrue(report.valid)
        self.assertEqual(report.as_text().splitlines()[0], 'No problems found.')

    def test_duplicates_are_warnings(self):
        lines = good_lines(10) + [good_lines(1)[0]]
        report = validate(lines)
        self.assertTrue(report.valid)
        self.assertEqual(report.duplicates, 1)
        self.assertEqual(str(report.warnings[0]), 'data.jsonl:11: duplicate of data.jsonl:1')

    def test_long_example_warning(self):
        long = {'messages': [{'role': 'user', 'content': 'word ' * 400}, GOOD['messages'][1]]}
        report = validate(good_lines() + [json.dumps(long).encode()], long_tokens=100)
        self.assertTrue(report.valid)
        self.assertEqual(report.long_examples, 1)
        self.assertEqual(report.warnings[0].line, 11)

    def test_statistics(self):
        counts = iter([5, 7, 9] * 4)
        report = validate(good_lines(12), count_tokens=lambda messages, limit=None: next(counts))
        self.assertEqual((report.examples, report.messages), (12, 24))
        self.assertEqual((report.tokens_min, report.tokens_max, report.tokens_total), (5, 9, 84))
        self.assertAlmostEqual(report.tokens_mean, 7.0)

    def test_accepted_shapes(self):
        call = {'id': 'c1', 'type': 'function', 'function': {'name': 'lookup', 'arguments': '{"q": 1}'}}
        examples = [
            {'messages': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
                          {'role': 'assistant', 'content': 'Hey', 'weight': 0},
                          {'role': 'user', 'content': [{'type': 'text', 'text': 'More?'}]},
                          {'role': 'assistant', 'content': 'Sure', 'weight': 1}]},
            {'messages': [{'role': 'user', 'content': 'Look up 1'}, {'role': 'assistant', 'tool_calls': [call]},
                          {'role': 'tool', 'tool_call_id': 'c1', 'content': 'one'},
                          {'role': 'assistant', 'content': 'It is one.'}],
             'tools': [{'type': 'function', 'function': {'name': 'lookup'}}], 'parallel_tool_calls': False},
        ]
        report = validate(good_lines(10) + [json.dumps(e).encode() for e in examples])
        self.assertTrue(report.valid, report.as_text())
        self.assertEqual(report.examples, 12)

    def test_estimate_grows_with_text(self):
        short = estimate_tokens([{'role': 'user', 'content': 'hi'}])
        longer = estimate_tokens([{'role': 'user', 'content': 'hi ' * 100}])
        self.assertGreater(longer, short + 50)

    def test_valid_examples_are_yielded_in_one_pass(self):
        data = b''.join(l + b'\n' for l in good_lines(3)) + b'{bad\n'
        validator = DatasetValidator(min_examples=0)
        lines = [line for line, _example in validator.add_file(io.BytesIO(data), 'x.jsonl')]
        self.assertEqual(lines, [1, 2, 3])
        self.assertEqual(validator.finish().error_count, 1)


def preference(i=0, **change):
    example = {'input': {'messages': [{'role': 'system', 'content': 'Be brief.'},
                                      {'role': 'user', 'content': 'Question %d?' % i}]},
               'preferred_output': [{'role': 'assistant', 'content': 'Short answer %d.' % i}],
               'non_preferred_output': [{'role': 'assistant', 'content': 'A long and rambling answer %d.' % i}]}
    example.update(change)
    return example


class TestPreferenceFormat(unittest.TestCase):
    """Preference pairs (DPO): ten good pairs, then one bad line 11."""

    def assertBadPair(self, bad, expected_reason, expected_field):
        lines = [json.dumps(preference(i)).encode() for i in range(10)] + [json.dumps(bad).encode()]
        report = validate(lines, data_format='preference')
        self.assertEqual([(p.line, p.field) for p in report.errors], [(11, expected_field)],
                         [str(p) for p in report.errors])
        self.assertIn(expected_reason, report.errors[0].message)

    def test_good_pairs(self):
        report = validate([json.dumps(preference(i)).encode() for i in range(10)], data_format='preference')
        self.assertTrue(report.valid, report.as_text())
        self.assertEqual((report.examples, report.messages), (10, 40))

    def test_chat_line_in_a_preference_dataset(self):
        self.assertBadPair(GOOD, "unknown key 'messages'", 'messages')

    def test_missing_input(self):
        bad = preference()
        del bad['input']
        self.assertBadPair(bad, 'is missing', 'input')

    def test_input_must_end_with_user(self):
        bad = preference(input={'messages': [{'role': 'user', 'content': 'Hi'},
                                             {'role': 'assistant', 'content': 'Hello'}]})
        self.assertBadPair(bad, 'must end with a user message', 'input.messages[1]')

    def test_bad_message_inside_input(self):
        bad = preference(input={'messages': [{'role': 'robot', 'content': 'Hi'}]})
        self.assertBadPair(bad, "unknown role 'robot'", 'input.messages[0].role')

    def test_two_preferred_outputs(self):
        bad = preference(preferred_output=[{'role': 'assistant', 'content': 'a'}] * 2)
        self.assertBadPair(bad, 'exactly one assistant message', 'preferred_output')

    def test_output_not_from_assistant(self):
        bad = preference(non_preferred_output=[{'role': 'user', 'content': 'no'}])
        self.assertBadPair(bad, 'must be an assistant message', 'non_preferred_output[0].role')

    def test_identical_outputs(self):
        bad = preference(non_preferred_output=[{'role': 'assistant', 'content': 'Short answer 0.'}])
        self.assertBadPair(bad, 'the pair must differ', 'non_preferred_output')

    def test_unknown_format(self):
        with self.assertRaisesRegex(ValueError, 'unknown dataset format'):
            DatasetValidator(data_format='rlhf')
