"""The Milvus vector store against a real Milvus server (the standalone server the `milvus`
package ships, started here on a free port) through pymilvus, the client a Milvus cluster uses;
the real embedding model; the rights filter of the retrieval on top."""
import base64
import os
import shutil
import socket
import time
import unittest

from odoo.exceptions import ValidationError
from odoo.tests.common import SavepointCase
from odoo.tools import config

FAR = time.time() + 3600
HANDBOOK = b"""# Refunds

Customers can ask for a refund within 30 days of delivery. The refund goes back to the card used
for the order, within five working days.

# Shipping

Orders ship from our warehouse in Rotterdam every weekday.
"""


def free_port():
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _clear_data(folder):
    """Everything of a Milvus base folder but its unpacked binaries."""
    if os.path.isdir(folder):
        for entry in os.listdir(folder):
            if entry != 'bin':
                shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def _log_tail(folder):
    try:
        with open(os.path.join(folder, 'logs', 'milvus-stderr.log')) as f:
            return f.read()[-500:]
    except OSError:
        return '(no log)'


class TestKnowledgeMilvus(SavepointCase):

    @classmethod
    def setUpClass(cls):
        from milvus import MilvusServer
        # the server's binaries (246 MB unpacked from the package at each start in a new folder) are
        # kept between runs; its data is not: a new test database reuses collection ids
        cls.folder = os.path.join(os.environ.get('LLMT_CACHE') or os.path.expanduser('~/.cache/llm_training'),
                                  'milvus_test', config['db_name'] or 'db')
        _clear_data(cls.folder)
        cls.milvus = MilvusServer(wait_for_started=False)
        cls.milvus.set_base_dir(cls.folder)
        cls.milvus.config.set('proxy_port', free_port())
        try:
            cls.milvus.start()
        except Exception as e:
            raise unittest.SkipTest('the Milvus server of the milvus package cannot start on this machine: %s' % e)
        super(TestKnowledgeMilvus, cls).setUpClass()
        cls.local = cls.env['llm.provider'].create({'name': 'Local', 'service': 'local'})
        cls.server = cls.local._adapter().model_server()
        cls.server.ensure_running()  # while Milvus starts
        try:
            cls.milvus.wait_started(120000)
        except Exception as e:
            cls.server.stop()
            cls.milvus.stop()
            reason = ('the Milvus server of the milvus package does not start on this machine: %s; its log: %s'
                      % (e, _log_tail(cls.folder)))
            _clear_data(cls.folder)
            super(TestKnowledgeMilvus, cls).tearDownClass()
            raise unittest.SkipTest(reason)
        cls.uri = 'http://127.0.0.1:%d' % cls.milvus.listen_port
        cls.previous_uri = config.get('llm_training_milvus_uri')
        config['llm_training_milvus_uri'] = cls.uri
        try:
            env = cls.env
            env.ref('base.res_partner_rule').active = True
            company_b = env['res.company'].create({'name': 'Milvus B'})
            partners = env['res.partner']
            cls.alice = partners.create({'name': 'Alice Strings', 'comment': 'Alice Strings sells violins and cellos.'})
            cls.zeta = partners.create({'name': 'Zeta Corp', 'company_id': company_b.id,
                                        'comment': 'Zeta Corp is the secret supplier of our violins.'})
            cls.collection = env['llm.knowledge.collection'].create({
                'name': 'On Milvus', 'provider_id': cls.local.id, 'store': 'milvus', 'chunk_size': 48,
                'chunk_overlap': 8})
            env['llm.knowledge.source'].create({
                'collection_id': cls.collection.id, 'name': 'handbook.md', 'kind': 'file',
                'datas_fname': 'handbook.md', 'datas': base64.b64encode(HANDBOOK)})
            cls.partners_source = env['llm.knowledge.source'].create({
                'collection_id': cls.collection.id, 'name': 'Partners', 'kind': 'records',
                'model_id': env.ref('base.model_res_partner').id,
                'domain': "[('id', 'in', %s)]" % [cls.alice.id, cls.zeta.id],
                'field_ids': [(6, 0, env['ir.model.fields'].search([('model', '=', 'res.partner'),
                                                                   ('name', '=', 'comment')]).ids)]})
            cls.collection._sync(FAR)
            cls.user = env['res.users'].create({
                'name': 'Milvus reader', 'login': 'knowledge_milvus_reader', 'password': 'knowledge_milvus_reader',
                'groups_id': [(6, 0, [env.ref('base.group_user').id])]})
        except Exception:
            cls.tearDownClass()  # no Milvus server left running behind a failed set-up
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            cls.server.stop()
            if cls.previous_uri is None:
                config.options.pop('llm_training_milvus_uri', None)
            else:
                config['llm_training_milvus_uri'] = cls.previous_uri
        finally:
            cls.milvus.stop()
            _clear_data(cls.folder)
            super(TestKnowledgeMilvus, cls).tearDownClass()

    def milvus_ids(self):
        """The chunk ids Milvus itself holds for the collection (asked with pymilvus)."""
        from pymilvus import Collection, connections
        connections.connect('test-check', uri=self.uri, timeout=30)
        name = self.collection._store().name(self.collection)
        rows = Collection(name, using='test-check').query('chunk_id >= 0', output_fields=['chunk_id'], timeout=30)
        return sorted(row['chunk_id'] for row in rows)

    def postgres_ids(self):
        return sorted(self.env['llm.knowledge.chunk'].search([('collection_id', '=', self.collection.id)]).ids)

    def test_0_milvus_needs_its_address(self):
        config['llm_training_milvus_uri'] = ''
        try:
            with self.assertRaisesRegex(ValidationError, 'llm_training_milvus_uri'):
                with self.env.cr.savepoint():
                    self.env['llm.knowledge.collection'].create({'name': 'Nowhere', 'store': 'milvus',
                                                                 'provider_id': self.local.id})
        finally:
            config['llm_training_milvus_uri'] = self.uri

    def test_1_milvus_ranks_and_the_rights_filter_applies(self):
        self.assertEqual(set(self.collection.source_ids.mapped('state')), {'done'})
        self.assertTrue(self.postgres_ids())
        self.assertEqual(self.milvus_ids(), self.postgres_ids(), 'every chunk vector is in Milvus')
        refund = self.collection.search_chunks('How long do I have to get my money back?', top_k=1)
        self.assertIn('30 days', refund[0]['text'])
        question = 'Who supplies our violins?'
        admin = self.collection.search_chunks(question, top_k=3)
        self.assertEqual(admin[0]['res_id'], self.zeta.id, 'Milvus ranks the closest chunk first')
        readable = self.env['llm.knowledge.chunk'].search([('collection_id', '=', self.collection.id), '|',
                                                          ('res_model', '!=', 'res.partner'),
                                                          ('res_id', '!=', self.zeta.id)])
        as_user = self.collection.sudo(self.user).search_chunks(question, top_k=len(readable))
        self.assertNotIn(self.zeta.id, [hit['res_id'] for hit in as_user if hit['res_model'] == 'res.partner'],
                         "another company's partner is filtered out after Milvus ranked it first")
        self.assertEqual(sorted(hit['chunk_id'] for hit in as_user), sorted(readable.ids),
                         'top-k counts only readable chunks: all of them, though Milvus ranked one other first')
        self.assertEqual((as_user[0]['res_model'], as_user[0]['res_id']), ('res.partner', self.alice.id))

    def test_2_a_changed_record_and_a_deleted_collection_reach_milvus(self):
        before = self.postgres_ids()
        self.alice.comment = 'Alice Strings now only tunes pianos.'
        self.collection._sync(FAR)
        after = self.postgres_ids()
        self.assertNotEqual(after, before)
        self.assertEqual(self.milvus_ids(), after, 'the old chunk left Milvus, the new one is there')
        pianos = self.collection.search_chunks('Who tunes pianos?', top_k=1)
        self.assertEqual(pianos[0]['res_id'], self.alice.id)
        from pymilvus import connections, utility
        connections.connect('test-check', uri=self.uri, timeout=30)
        name = self.collection._store().name(self.collection)
        self.assertTrue(utility.has_collection(name, using='test-check'))
        self.collection.write({'chunk_size': 40})  # a new size: the store is emptied, the sources re-indexed
        self.assertFalse(utility.has_collection(name, using='test-check'))
        self.collection._sync(FAR)
        self.assertEqual(self.milvus_ids(), self.postgres_ids())
        self.collection.unlink()
        self.assertFalse(utility.has_collection(name, using='test-check'), 'a deleted collection leaves Milvus')
