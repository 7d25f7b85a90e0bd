"""Data in the shapes people have it: prompt/completion and plain text, in JSONL, CSV or Parquet,
uploaded or read in place from the training storage; converted to what the trainer reads."""
import base64
import csv
import io
import json
import os
import shutil
import signal
import stat
import tempfile
import unittest
from unittest import mock

import pyarrow
import pyarrow.parquet as pq

from odoo.exceptions import AccessError, UserError
from odoo.tools import config

from odoo.addons.llm_training.lib.jobs import trainer_folder
from odoo.addons.llm_training.lib.datasets.dataset_validator import validate_files
from odoo.addons.llm_training.user_errors import JobRefused

from .common import TrainingCase, jsonl


def csv_bytes(header, rows):
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode('utf-8')


def parquet_bytes(columns, row_group_size=4):
    buf = io.BytesIO()
    pq.write_table(pyarrow.table(columns), buf, row_group_size=row_group_size)
    return buf.getvalue()


def read_jsonl(path):
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f]


class TestReaders(unittest.TestCase):
    """The readers as plain functions: files as spreadsheets and other tools write them."""

    def validate(self, name, content, **options):
        options.setdefault('data_format', 'prompt_completion')
        return validate_files([(name, io.BytesIO(content))], **options)

    def test_spreadsheet_csv_with_bom_and_crlf(self):
        rows = ''.join('Q%d,A%d\r\n' % (i, i) for i in range(10))
        report = self.validate('excel.csv', b'\xef\xbb\xbfprompt,completion\r\n' + rows.encode(), file_type='csv')
        self.assertEqual((report.error_count, report.examples), (0, 10), report.as_text())

    def test_csv_line_over_the_limit_stops_the_file_at_its_row(self):
        rows = ''.join('Q%d,A%d\n' % (i, i) for i in range(10)).encode()
        content = b'prompt,completion\n' + rows + b'"' + b'x' * 5000 + b'",y\nQ,A\n'
        report = self.validate('big.csv', content, file_type='csv', max_line_bytes=4096)
        self.assertEqual(report.examples, 10)
        self.assertEqual([str(p) for p in report.errors], [
            'big.csv:12: a line of this row is over the limit of 4096 bytes for one example; shorten it (the rest '
            'of this file was not read)'])

    def test_csv_not_utf8_names_its_row(self):
        report = self.validate('latin.csv', b'prompt,completion\nQ,A\nQ\xe9,A\n', file_type='csv')
        self.assertIn('latin.csv:3: not valid UTF-8 (byte 2 of line 3)', str(report.errors[0]))

    def test_not_a_parquet_file(self):
        report = self.validate('fake.parquet', b'prompt,completion\n', file_type='parquet')
        self.assertIn('fake.parquet: not a Parquet file', str(report.errors[0]))


class FormatsCase(TrainingCase):

    def dataset(self, content, name, env=None, **values):
        dataset = self.make_dataset(content, name=name, env=env)
        dataset.write(values)
        return dataset

    def prepared(self, dataset, **values):
        """What the trainer would read: the job's prepared train.jsonl."""
        job = self.make_job(dataset, validation_split=0.0, **values)
        self.addCleanup(shutil.rmtree, job.work_dir, True)
        job._prepare_files()
        return job, read_jsonl(os.path.join(job.work_dir, 'train.jsonl'))


class TestConversions(FormatsCase):

    def test_csv_prompt_completion_becomes_chat(self):
        # a comma, a quote and a line break inside values: quoting is the csv module's business
        rows = [['Question %d, "quoted"\nsecond line' % i, 'Answer %d' % i, 'ignored'] for i in range(11)]
        dataset = self.dataset(csv_bytes(['prompt', 'completion', 'source'], rows), 'faq.csv',
                               data_format='prompt_completion', file_type='csv')
        dataset.action_validate()
        self.assertEqual(dataset.state, 'valid', dataset.validation_report)
        self.assertEqual((dataset.example_count, dataset.message_count), (11, 22))
        _job, examples = self.prepared(dataset)
        self.assertEqual(len(examples), 11)
        self.assertEqual(examples[3], {'messages': [
            {'role': 'user', 'content': 'Question 3, "quoted"\nsecond line'},
            {'role': 'assistant', 'content': 'Answer 3'}]})

    def test_parquet_with_mapped_columns_and_system_prompt(self):
        content = parquet_bytes({'question': ['Q%d' % i for i in range(10)],
                                 'answer': ['A%d' % i for i in range(10)], 'score': list(range(10))})
        dataset = self.dataset(content, 'faq.parquet', data_format='prompt_completion', file_type='parquet',
                               prompt_column='question', completion_column='answer', system_prompt='Be brief.')
        dataset.action_validate()
        self.assertEqual(dataset.state, 'valid', dataset.validation_report)
        self.assertEqual((dataset.example_count, dataset.message_count), (10, 30))
        _job, examples = self.prepared(dataset)
        self.assertEqual([e['messages'][1]['content'] for e in examples], ['Q%d' % i for i in range(10)])
        self.assertEqual(examples[9]['messages'], [{'role': 'system', 'content': 'Be brief.'},
                                                   {'role': 'user', 'content': 'Q9'},
                                                   {'role': 'assistant', 'content': 'A9'}])

    def test_bad_rows_name_file_row_and_column(self):
        rows = [['Q%d' % i, 'A%d' % i] for i in range(10)] + [['Q10', '  ']] + [['Q11']]
        dataset = self.dataset(csv_bytes(['prompt', 'completion'], rows), 'faq.csv',
                               data_format='prompt_completion', file_type='csv')
        dataset.action_validate()
        self.assertEqual(dataset.state, 'invalid')
        self.assertEqual(dataset.example_count, 10)
        # the header is row 1, as a spreadsheet shows it: the 11th data row is row 12
        self.assertIn('faq.csv:12: completion: is empty; give the completion or remove the row',
                      dataset.validation_report)
        self.assertIn('faq.csv:13: the row has 1 field(s) and the header 2', dataset.validation_report)
        problems = json.loads(dataset.validation_problems)['errors']
        self.assertEqual(problems[0], {'file': 'faq.csv', 'line': 12, 'field': 'completion',
                                       'message': 'is empty; give the completion or remove the row'})

    def test_parquet_bad_row_and_missing_column(self):
        content = parquet_bytes({'prompt': ['Q%d' % i for i in range(11)],
                                 'completion': ['A%d' % i for i in range(10)] + [None]})
        dataset = self.dataset(content, 'faq.parquet', data_format='prompt_completion', file_type='parquet')
        dataset.action_validate()
        self.assertIn('faq.parquet:11: completion: is empty', dataset.validation_report)
        self.assertEqual(dataset.example_count, 10)
        dataset.write({'completion_column': 'reply'})
        self.assertEqual(dataset.state, 'draft', 'a new mapping: the old verdict no longer holds')
        dataset.action_validate()
        self.assertIn('faq.parquet: reply: no column "reply" (the file has prompt, completion); rename the '
                      'column or set the column names on the dataset', dataset.validation_report)

    def test_file_type_must_match_the_file(self):
        content = parquet_bytes({'prompt': ['Q'], 'completion': ['A']})
        dataset = self.dataset(content, 'faq.parquet', data_format='prompt_completion')  # File Type left at JSONL
        dataset.action_validate()
        self.assertIn("faq.parquet: the file is named .parquet but the dataset's File Type is JSONL; set File Type "
                      "to PARQUET", dataset.validation_report)

    def test_file_type_follows_the_file_name_in_the_form(self):
        attachment = self.env['ir.attachment'].create({'name': 'faq.CSV', 'datas_fname': 'faq.CSV',
                                                       'datas': base64.b64encode(b'prompt,completion\n')})
        form = self.env['llm.training.dataset'].new({'attachment_ids': [(6, 0, attachment.ids)], 'file_type': 'jsonl'})
        form._onchange_file_type()
        self.assertEqual(form.file_type, 'csv')
        form = self.env['llm.training.dataset'].new({'server_path': 'exports/faq.parquet', 'file_type': 'csv'})
        form._onchange_file_type()
        self.assertEqual(form.file_type, 'parquet')

    def test_jsonl_prompt_completion_openai_legacy_keys(self):
        lines = [{'prompt': 'P%d' % i, 'completion': 'C%d' % i} for i in range(10)] + [{'prompt': 'P10'}]
        dataset = self.dataset(jsonl(lines), 'legacy.jsonl', data_format='prompt_completion')
        dataset.action_validate()
        self.assertEqual(dataset.example_count, 10)
        self.assertIn('legacy.jsonl:11: completion: missing; each row needs a "completion" value',
                      dataset.validation_report)

    def test_chat_in_csv_and_parquet_from_a_messages_column(self):
        messages = [json.dumps([{'role': 'user', 'content': 'Hi %d' % i},
                                {'role': 'assistant', 'content': 'Yo %d' % i}]) for i in range(10)]
        for name, content, file_type in (
                ('chat.csv', csv_bytes(['messages'], [[m] for m in messages] + [['[{"role": "bot"}]']]), 'csv'),
                ('chat.parquet', parquet_bytes({'messages': messages + ['[{"role": "bot"}]']}), 'parquet')):
            dataset = self.dataset(content, name, file_type=file_type)
            dataset.action_validate()
            self.assertEqual(dataset.example_count, 10, dataset.validation_report)
            row = 12 if file_type == 'csv' else 11
            self.assertIn("%s:%d: messages[0].role: unknown role 'bot'" % (name, row), dataset.validation_report)

    def test_preference_is_jsonl_only(self):
        dataset = self.dataset(csv_bytes(['messages'], [['[]']]), 'pairs.csv', file_type='csv',
                               data_format='preference')
        with self.assertRaisesRegex(UserError, 'preference \\(DPO\\) datasets are read from JSONL files only'):
            dataset.action_validate()

    def test_text_format(self):
        texts = ['Paragraph %d of the handbook.' % i for i in range(10)]
        dataset = self.dataset(csv_bytes(['body'], [[t] for t in texts] + [['']]), 'handbook.csv',
                               data_format='text', file_type='csv', text_column='body')
        dataset.action_validate()
        self.assertEqual(dataset.example_count, 10)
        self.assertEqual(dataset.message_count, 0, 'text has no messages')
        self.assertIn('handbook.csv:12: body: is empty; give the text to learn', dataset.validation_report)
        job, examples = self.prepared(dataset)
        self.assertEqual(examples, [{'text': t} for t in texts])
        self.assertEqual(job._data_format(), 'text')

    def test_text_and_chat_do_not_mix_in_a_job(self):
        text = self.dataset(jsonl([{'text': 'T%d' % i} for i in range(10)]), 'text.jsonl', data_format='text')
        job = self.make_job(text, validation_dataset_ids=[(6, 0, self.make_dataset().ids)])
        with self.assertRaisesRegex(JobRefused, 'The datasets mix chat and text formats'):
            job.action_submit()  # refused at Submit: the job stays a draft to fix
        self.assertEqual(job.state, 'draft')


class TestPreview(FormatsCase):

    def test_prompt_completion_preview_shows_the_chat_the_trainer_sees(self):
        rows = [['Question <%d>' % i, 'Answer %d' % i] for i in range(8)]
        dataset = self.dataset(csv_bytes(['prompt', 'completion'], rows), 'faq.csv', data_format='prompt_completion',
                               file_type='csv', system_prompt='Be brief.')
        preview = dataset.preview
        self.assertIn('<b>system</b>: Be brief.', preview)
        self.assertIn('<b>user</b>: Question &lt;0&gt;', preview, 'contents are escaped')
        self.assertIn('<b>assistant</b>: Answer 4', preview)
        self.assertIn('Example 5', preview)
        self.assertNotIn('Example 6', preview)
        self.assertNotIn('Answer 5', preview)

    def test_text_preview_and_problems(self):
        dataset = self.dataset(jsonl([{'body': ''}] + [{'body': 'Chapter %d' % i} for i in range(3)]), 'book.jsonl',
                               data_format='text', text_column='body')
        preview = dataset.preview
        self.assertIn('<pre style="white-space: pre-wrap">Chapter 0</pre>', preview)
        self.assertIn('Example 3', preview)
        self.assertIn('1 problem(s) on the way, e.g. book.jsonl:1: body: is empty', preview)


class TestServerPath(FormatsCase):

    @classmethod
    def setUpClass(cls):
        super(TestServerPath, cls).setUpClass()
        Users = cls.env['res.users'].with_context(no_reset_password=True)
        cls.user = Users.create({'name': 'Formats User', 'login': 'formats_user', 'email': 'user@example.com',
                                 'groups_id': [(6, 0, [cls.env.ref('base.group_user').id])]})
        cls.manager = Users.create({'name': 'Formats Manager', 'login': 'formats_manager', 'email': 'mgr@example.com',
                                    'groups_id': [(6, 0, [cls.env.ref('llm_training.group_llm_manager').id])]})

    def setUp(self):
        super(TestServerPath, self).setUp()
        self.base = tempfile.mkdtemp(prefix='llmt-data-')
        self.addCleanup(shutil.rmtree, self.base, True)
        self.root = os.path.join(self.base, 'root')
        os.makedirs(os.path.join(self.root, 'sub'))
        rows = [['Q%d' % i, 'A%d' % i] for i in range(12)]
        self.inside = os.path.join(self.root, 'sub', 'faq.csv')
        with open(self.inside, 'wb') as f:
            f.write(csv_bytes(['prompt', 'completion'], rows))
        self.outside = os.path.join(self.base, 'secret.csv')
        shutil.copy(self.inside, self.outside)
        patcher = mock.patch.dict(config.options, {'llm_training_data_root': self.root})
        patcher.start()
        self.addCleanup(patcher.stop)
        self.Dataset = self.env['llm.training.dataset'].sudo(self.manager)

    def create(self, path, Dataset=None):
        Dataset = self.Dataset if Dataset is None else Dataset  # an empty recordset is falsy: no `or`
        return Dataset.create({'name': 'On storage', 'server_path': path, 'file_type': 'csv',
                               'data_format': 'prompt_completion'})

    def test_refused_for_a_non_manager(self):
        with self.assertRaisesRegex(AccessError, 'Only LLM Managers may set a server path'):
            self.create(self.inside, Dataset=self.env['llm.training.dataset'].sudo(self.user))
        dataset = self.create(self.inside)
        with self.assertRaisesRegex(AccessError, 'Only LLM Managers may set a server path'):
            dataset.sudo(self.user).write({'server_path': self.inside})

    def test_refused_outside_the_root(self):
        os.symlink(self.outside, os.path.join(self.root, 'escape.csv'))
        for path in (self.outside, os.path.join(self.root, 'sub', '..', '..', 'secret.csv'), '../secret.csv',
                     os.path.join(self.root, 'escape.csv')):
            with self.assertRaisesRegex(UserError, 'is outside the training data root'):
                self.create(path)
        with self.assertRaisesRegex(UserError, 'is not a file under the training data root'):
            self.create(os.path.join(self.root, 'missing.csv'))

    def test_refused_without_a_root(self):
        with mock.patch.dict(config.options, {'llm_training_data_root': ''}):
            with self.assertRaisesRegex(UserError, 'the Odoo configuration sets no llm_training_data_root'):
                self.create(self.inside)

    def test_accepted_under_the_root_and_read_in_place(self):
        Attachment = self.env['ir.attachment'].sudo()
        attachments_before = Attachment.search_count([])
        dataset = self.create('sub/faq.csv')  # relative to the root
        dataset.action_validate()
        self.assertEqual(dataset.state, 'valid', dataset.validation_report)
        self.assertEqual(dataset.example_count, 12)
        self.assertFalse(dataset.attachment_ids)
        self.assertEqual(Attachment.search_count([]), attachments_before, 'nothing copied into the database')
        self.assertIn('<b>user</b>: Q0', dataset.preview)
        job, examples = self.prepared(dataset.sudo())
        self.assertEqual(len(examples), 12)
        # the job folder holds the training data: this user's only, and so is the folder of every job's
        self.assertEqual(oct(stat.S_IMODE(os.stat(job.work_dir).st_mode)), oct(0o700))
        self.assertEqual(oct(stat.S_IMODE(os.stat(os.path.join(config['data_dir'], 'llm_training')).st_mode)),
                         oct(0o700))
        # a link swapped after saving is caught when the file is opened
        os.remove(self.inside)
        os.symlink(self.outside, self.inside)
        with self.assertRaisesRegex(UserError, 'is outside the training data root'):
            dataset.action_validate()

    def test_a_link_swapped_in_between_check_and_open_is_not_followed(self):
        """The race: the path is checked, then a link to a file outside the root takes the checked
        file's place, then the file is opened. It must not be read."""
        with open(self.outside, 'wb') as f:
            f.write(csv_bytes(['prompt', 'completion'], [['SECRET %d' % i, 'LEAK'] for i in range(12)]))
        dataset = self.create('sub/faq.csv')
        real_isfile = os.path.isfile
        inside = os.path.realpath(self.inside)
        swapped = []

        def isfile_then_swap(path):  # the check's last look at the file, then the swap
            result = real_isfile(path)
            if path == inside and not swapped:
                os.remove(self.inside)
                os.symlink(self.outside, self.inside)
                swapped.append(path)
            return result
        with mock.patch('os.path.isfile', side_effect=isfile_then_swap):
            with self.assertRaisesRegex(UserError, 'is outside the training data root'):
                for _name, stream in dataset.sudo()._data_streams():
                    self.assertNotIn(b'SECRET', stream.read())
        self.assertTrue(swapped)
        # a folder of the path swapped for a link: refused the same way
        os.remove(self.inside)
        shutil.copy(os.path.join(self.base, 'secret.csv'), os.path.join(self.base, 'faq.csv'))
        shutil.move(os.path.join(self.root, 'sub'), os.path.join(self.base, 'old-sub'))
        os.makedirs(os.path.join(self.root, 'sub'))
        with open(self.inside, 'wb') as f:
            f.write(csv_bytes(['prompt', 'completion'], [['Q', 'A']]))
        swapped[:] = []

        def isfile_then_swap_folder(path):
            result = real_isfile(path)
            if path == inside and not swapped:
                shutil.rmtree(os.path.join(self.root, 'sub'))
                os.symlink(self.base, os.path.join(self.root, 'sub'))  # sub/faq.csv is now base/faq.csv
                swapped.append(path)
            return result
        with mock.patch('os.path.isfile', side_effect=isfile_then_swap_folder):
            with self.assertRaisesRegex(UserError, 'is outside the training data root'):
                for _name, stream in dataset.sudo()._data_streams():
                    self.assertNotIn(b'SECRET', stream.read())
        self.assertTrue(swapped)


class TestTextTraining(TrainingCase):
    """A text dataset trains for real on the local trainer (SmolLM2) and is refused by OpenAI."""

    @classmethod
    def setUpClass(cls):
        super(TestTextTraining, cls).setUpClass()
        cls.local = cls.env['llm.provider'].create({'name': 'Local', 'service': 'local', 'max_concurrent_jobs': 2})
        cls.smol = cls.env['llm.model'].create({'name': 'SmolLM2', 'provider_id': cls.local.id,
                                                'model_ref': 'SmolLM2-135M-Instruct', 'context_length': 8192})
        texts = ['The warehouse code for shelf %d is KIWI-%d.' % (i % 4, i % 4) for i in range(12)]
        cls.texts = texts
        cls.data = cls.make_dataset(jsonl([{'text': t} for t in texts]), name='shelves.jsonl')
        cls.data.data_format = 'text'

    def tearDown(self):
        for job in self.env['llm.training.job'].search([('provider_id', '=', self.local.id)]):
            data = job._get_provider_data()
            if trainer_folder.is_alive(data.get('pid'), data.get('start_time')):
                os.killpg(data['pid'], signal.SIGKILL)
        super(TestTextTraining, self).tearDown()

    def test_text_job_trains_to_completed(self):
        job = self.trainer_job(self.data, self.local, self.smol, epochs=1, validation_split=0.0)
        job.action_submit()
        self.run_cron()
        self.assertEqual(job.state, 'queued', job.error_message)
        # counted as the trainer sees text: its tokens and an end token, no chat template around it
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(os.path.join(config['llm_training_models_dir'], 'SmolLM2-135M-Instruct',
                                                     'tokenizer.json'))
        self.assertEqual(self.data.token_total,
                         sum(len(tokenizer.encode(t, add_special_tokens=False).ids) + 1 for t in self.texts))
        with open(os.path.join(job.work_dir, 'config.json')) as f:
            self.assertEqual(json.load(f)['data_format'], 'text')
        self.assertEqual(read_jsonl(os.path.join(job.work_dir, 'train.jsonl'))[0], {'text': self.texts[0]})
        self.wait_until(job, lambda j: j.state in ('completed', 'failed'))
        self.assertEqual(job.state, 'completed', job.error_message)
        self.assertEqual(job.total_steps, 3)  # 12 texts / batch 4 x 1 epoch
        self.assertTrue(job.result_model_id)

    def test_openai_cannot_train_text(self):
        openai = self.env['llm.provider'].create({'name': 'OpenAI', 'service': 'openai', 'max_concurrent_jobs': 0})
        gpt = self.env['llm.model'].create({'name': 'GPT', 'provider_id': openai.id,
                                            'model_ref': 'gpt-4o-mini-2024-07-18', 'context_length': 65536})
        self.assertFalse(openai.supports_text)
        self.assertTrue(self.local.supports_text)
        job = self.make_job(self.data, provider=openai, base_model_id=gpt.id)
        with self.assertRaisesRegex(JobRefused, r'Provider "OpenAI" cannot train plain text \(continued pre-training\)'):
            job.action_submit()
        self.assertEqual(job.state, 'draft')
        # a dataset's format changed after Submit: Validating refuses it the same way
        self.data.data_format = 'chat'
        job.action_submit()
        self.data.data_format = 'text'
        self.run_cron()
        self.assertEqual(job.state, 'failed')
        self.assertIn('Provider "OpenAI" cannot train plain text (continued pre-training)', job.error_message)
        self.assertFalse(job.external_job_id, 'nothing was sent')
