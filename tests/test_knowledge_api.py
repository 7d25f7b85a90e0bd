"""Knowledge over the wire: /v1/embeddings, /v1/vector_stores (files, file batches, search) and a
chat completion whose model is an assistant, driven by the newest `openai` SDK and checked against
OpenAI's schema; the assistant's XML-RPC `answer`. A user who cannot read a source never gets its
chunk, whichever way it asks."""
import base64
import os
import subprocess
import xmlrpc.client

import odoo

from .test_knowledge import HANDBOOK
from .test_openai_api import ApiCase, client_python

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'clients', 'openai_knowledge_driver.py')


class TestKnowledgeApi(ApiCase):

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        super(TestKnowledgeApi, cls).tearDownClass()

    @classmethod
    def setUpClass(cls):
        super(TestKnowledgeApi, cls).setUpClass()
        cls.server = None

    def start_driver(self):
        self.driver = subprocess.Popen([client_python(), DRIVER, self.base_url, self.manager_key],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True)

    def upload_kb(self, filename, content):
        return self.ok('upload_kb', filename=filename, content=base64.b64encode(content).decode())

    def sync(self):
        self.env['llm.knowledge.collection']._cron_sync_knowledge()
        self.env['llm.knowledge.source'].invalidate_cache()

    def test_vector_stores_embeddings_and_assistants_over_the_api(self):
        env = self.env
        local = env['llm.provider'].create({'name': 'Local', 'service': 'local'})
        type(self).server = local._adapter().model_server()
        env.ref('base.res_partner_rule').active = True  # partners per company
        company_b = env['res.company'].create({'name': 'API B'})
        zeta = env['res.partner'].create({'name': 'Zeta Corp', 'company_id': company_b.id,
                                          'comment': 'Zeta Corp is the secret supplier of our violins.'})
        alice = env['res.partner'].create({'name': 'Alice Ltd', 'comment': 'Alice Ltd buys violins every spring.'})
        user = env['res.users'].create({'name': 'API restricted', 'login': 'api_restricted',
                                        'password': 'api_restricted',
                                        'groups_id': [(6, 0, [env.ref('base.group_user').id])]})
        user_key = self.make_key(user, 'restricted')

        # embeddings: the SDK asks for base64 by default and decodes it
        answer = self.ok('embed', model='all-MiniLM-L6-v2', input=['refund policy', 'shipping'])
        self.assertEqual([len(e['embedding']) for e in answer['data']], [384, 384])
        self.assertGreater(answer['usage']['prompt_tokens'], 0)
        floats = self.ok('embed', model='all-MiniLM-L6-v2', input='refund policy', encoding_format='float')
        self.assertAlmostEqual(floats['data'][0]['embedding'][0], answer['data'][0]['embedding'][0], places=5)
        self.refused(404, 'embed', model='no-such-embedder', input='x', code='model_not_found', param='model')

        # a vector store, a file indexed by the cron: in_progress, then completed
        handbook = self.upload_kb('handbook.md', HANDBOOK)
        self.assertTrue(handbook['id'].startswith('file-kb-'))
        store = self.ok('vs_create', name='Policies')
        self.assertEqual((store['status'], store['file_counts']['total']), ('completed', 0))
        added = self.ok('vs_file_create', store=store['id'], file=handbook['id'])
        self.assertEqual(added['status'], 'in_progress')
        self.sync()
        self.assertEqual(self.ok('vs_file_get', store=store['id'], file=handbook['id'])['status'], 'completed')
        # a file batch with a broken file: that one fails with its reason, the other completes
        faq = self.upload_kb('faq.txt', b'The support desk is open from 9:00 to 17:00, Monday to Friday.')
        broken = self.upload_kb('broken.pdf', b'%PDF-1.4 not really')
        batch = self.ok('vs_batch_create', store=store['id'], files=[faq['id'], broken['id']])
        self.assertEqual((batch['status'], batch['file_counts']['in_progress']), ('in_progress', 2))
        self.sync()
        batch = self.ok('vs_batch_get', store=store['id'], batch=batch['id'])
        self.assertEqual((batch['status'], batch['file_counts']['completed'], batch['file_counts']['failed']),
                         ('completed', 1, 1))
        files = {f['id']: f for f in self.ok('vs_batch_files', store=store['id'], batch=batch['id'])['data']}
        self.assertIn('unreadable PDF', files[broken['id']]['last_error']['message'])
        self.assertEqual(len(self.ok('vs_files', store=store['id'])['data']), 3)

        # search: best first, scores within [0, 1], max_num_results and score_threshold honoured
        page = self.ok('vs_search', store=store['id'], query='When can I call support?', max_num_results=2)
        self.assertEqual(page['data'][0]['file_id'], faq['id'])
        self.assertLessEqual(len(page['data']), 2)
        self.assertTrue(all(0 <= item['score'] <= 1 for item in page['data']))
        self.assertEqual(self.ok('vs_search', store=store['id'], query='When can I call support?',
                                 ranking_options={'score_threshold': 0.99})['data'], [])
        # a file taken out of the store: its chunks leave every worker's index (the version moves)
        version = env['llm.knowledge.collection'].browse(int(store['id'][3:])).index_version
        self.assertTrue(self.ok('vs_file_delete', store=store['id'], file=faq['id'])['deleted'])
        env['llm.knowledge.collection'].invalidate_cache()
        self.assertGreater(env['llm.knowledge.collection'].browse(int(store['id'][3:])).index_version, version)
        page = self.ok('vs_search', store=store['id'], query='When can I call support?', max_num_results=5)
        self.assertNotIn(faq['id'], [item['file_id'] for item in page['data']])
        self.refused(404, 'vs_file_get', store=store['id'], file=faq['id'])

        # records in the same store: the restricted user never gets another company's partner
        collection = env['llm.knowledge.collection'].browse(int(store['id'][3:]))
        env['llm.knowledge.source'].create({
            'collection_id': collection.id, 'name': 'Customers', 'kind': 'records',
            'model_id': env.ref('base.model_res_partner').id, 'domain': "[('comment', '!=', False)]",
            'field_ids': [(6, 0, env['ir.model.fields'].search([('model', '=', 'res.partner'),
                                                                 ('name', '=', 'comment')]).ids)]})
        self.sync()
        question = 'Who supplies our violins?'
        as_manager = self.ok('vs_search', store=store['id'], query=question, max_num_results=10)['data']
        self.assertIn('res.partner-%d' % zeta.id, [item['file_id'] for item in as_manager])
        as_user = self.ok('vs_search', key=user_key, store=store['id'], query=question, max_num_results=10)['data']
        self.assertNotIn('res.partner-%d' % zeta.id, [item['file_id'] for item in as_user])
        self.assertIn('res.partner-%d' % alice.id, [item['file_id'] for item in as_user])

        # an assistant as a chat model, and its XML-RPC answer as the restricted user
        chatty = env['llm.provider'].create({'name': 'Scripted chat', 'service': 'test_chat'})
        echo = env['llm.model'].create({'name': 'Echo', 'provider_id': chatty.id, 'model_ref': 'echo'})
        assistant = env['llm.assistant'].create({'name': 'violin-desk', 'model_id': echo.id, 'top_k': 3,
                                                 'score_threshold': 0.1, 'collection_ids': [(6, 0, collection.ids)]})
        completion = self.ok('chat', key=user_key, model='violin-desk',
                             messages=[{'role': 'user', 'content': question}])
        content = completion['choices'][0]['message']['content']
        self.assertIn('Sources:', content)
        self.assertIn('Alice Ltd', content)
        self.assertNotIn('Zeta', content.split('Sources:')[1])
        self.cr.commit()  # a test cursor's commit is a savepoint: XML-RPC shares the cursor
        url = 'http://127.0.0.1:%d/xmlrpc/2/object' % odoo.tools.config['http_port']
        result = xmlrpc.client.ServerProxy(url).execute_kw(self.cr.dbname, user.id, 'api_restricted', 'llm.assistant',
                                                           'answer', [[assistant.id], question])
        self.assertTrue(result['sources'])
        self.assertNotIn(zeta.id, [s['res_id'] for s in result['sources'] if s['res_model'] == 'res.partner'])

        # a user outside the store's readers does not see it at all
        collection.reader_group_ids = env.ref('llm_training.group_llm_manager')
        self.refused(404, 'vs_search', key=user_key, store=store['id'], query=question, code='vector_store_not_found')
        self.assertEqual(self.ok('vs_delete', id=store['id'])['deleted'], True)
        self.refused(404, 'vs_get', id=store['id'])
        self.assert_no_violations()
