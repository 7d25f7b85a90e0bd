"""Knowledge collections and assistants with the real embedding model (all-MiniLM-L6-v2 in the
model server), the real SmolLM2 for one answer, real PostgreSQL: one indexed collection for the
class, tiny documents."""
import base64
import time

from odoo.exceptions import ValidationError
from odoo.tests.common import SavepointCase

from odoo.addons.llm_training.lib.knowledge.stores import EmbeddedStore

HANDBOOK = b"""# Refunds

Customers can ask for a refund within 30 days of delivery. The refund goes back to the card used
for the order, within five working days.

# Shipping

Orders ship from our warehouse in Rotterdam every weekday. Parcels to Germany arrive in two days.
"""
FAQ_HTML = b"""<html><head><style>p {color: red}</style><script>var secret = 'hidden';</script></head>
<body><h1>Opening hours</h1><p>The support desk is open from 9:00 to 17:00, Monday to Friday.</p></body></html>"""
ARABIC_FILES = [  # refunds, opening hours, warranty
    ('refunds.md', u'يمكن للعميل استرداد المبلغ خلال ثلاثين يوما من الشراء إذا كان المنتج في حالته الأصلية.'),
    ('hours.md', u'يعمل فريق خدمة العملاء من التاسعة صباحا حتى الخامسة مساء من الأحد إلى الخميس.'),
    ('warranty.md', u'تتمتع الأجهزة بضمان لمدة سنتين ضد عيوب التصنيع ولا يشمل الضرر الناتج عن الماء.'),
]
FAR = time.time() + 3600


def file_source(collection, name, content):
    return collection.env['llm.knowledge.source'].create({
        'collection_id': collection.id, 'name': name, 'kind': 'file', 'datas_fname': name,
        'datas': base64.b64encode(content) if content else False})


class TestKnowledge(SavepointCase):

    @classmethod
    def setUpClass(cls):
        super(TestKnowledge, cls).setUpClass()
        env = cls.env
        cls.local = env['llm.provider'].create({'name': 'Local', 'service': 'local'})
        cls.server = cls.local._adapter().model_server()
        env.ref('base.res_partner_rule').active = True  # partners per company, as a multi-company set-up has them
        cls.company_b = env['res.company'].create({'name': 'Knowledge B'})
        partners = env['res.partner']
        cls.alice = partners.create({'name': 'Alice Ltd', 'comment': 'Alice Ltd buys violins and cellos every spring.'})
        cls.bob = partners.create({'name': 'Bob Bikes', 'comment': 'Bob Bikes repairs bicycles in Utrecht.'})
        cls.carol = partners.create({'name': 'Carol Cakes', 'comment': 'Carol Cakes bakes wedding cakes.'})
        cls.zeta = partners.create({'name': 'Zeta Corp', 'company_id': cls.company_b.id,
                                    'comment': 'Zeta Corp is the secret supplier of our violins.'})
        cls.action = env['ir.actions.server'].create({
            'name': 'Knowledge test action', 'model_id': env.ref('base.model_res_partner').id, 'state': 'code',
            'code': 'password_of_the_vault = "violin-key"'})
        cls.collection = env['llm.knowledge.collection'].create({'name': 'Handbook', 'provider_id': cls.local.id,
                                                                 'chunk_size': 48, 'chunk_overlap': 8})
        cls.handbook = file_source(cls.collection, 'handbook.md', HANDBOOK)
        cls.faq = file_source(cls.collection, 'faq.html', FAQ_HTML)
        Fields = env['ir.model.fields']
        cls.partners_source = env['llm.knowledge.source'].create({
            'collection_id': cls.collection.id, 'name': 'Customers', 'kind': 'records',
            'model_id': env.ref('base.model_res_partner').id, 'domain': "[('comment', '!=', False)]",
            'field_ids': [(6, 0, Fields.search([('model', '=', 'res.partner'), ('name', '=', 'comment')]).ids)]})
        cls.actions_source = env['llm.knowledge.source'].create({
            'collection_id': cls.collection.id, 'name': 'Actions', 'kind': 'records',
            'model_id': env.ref('base.model_ir_actions_server').id, 'domain': "[('name', '=', 'Knowledge test action')]",
            'field_ids': [(6, 0, Fields.search([('model', '=', 'ir.actions.server'), ('name', 'in', ('name', 'code'))]).ids)]})
        examples = b'{"messages": [{"role": "user", "content": "What is the vault code word?"}, ' \
                   b'{"role": "assistant", "content": "The vault code word is marmalade."}]}\n'
        attachment = env['ir.attachment'].create({'name': 'vault.jsonl', 'datas_fname': 'vault.jsonl',
                                                  'datas': base64.b64encode(examples)})
        cls.dataset = env['llm.training.dataset'].create({'name': 'Vault', 'visibility': 'restricted',
                                                          'attachment_ids': [(6, 0, attachment.ids)]})
        cls.dataset_source = env['llm.knowledge.source'].create({
            'collection_id': cls.collection.id, 'name': 'Vault answers', 'kind': 'dataset',
            'dataset_id': cls.dataset.id})
        cls.collection._sync(FAR)
        cls.user = env['res.users'].create({
            'name': 'Restricted', 'login': 'knowledge_restricted', 'password': 'knowledge_restricted',
            'groups_id': [(6, 0, [env.ref('base.group_user').id])]})
        chatty = env['llm.provider'].create({'name': 'Scripted chat', 'service': 'test_chat'})
        cls.echo = env['llm.model'].create({'name': 'Echo', 'provider_id': chatty.id, 'model_ref': 'echo'})
        cls.assistant = env['llm.assistant'].create({'name': 'Support', 'model_id': cls.echo.id, 'top_k': 3,
                                                     'score_threshold': 0.1,
                                                     'collection_ids': [(6, 0, cls.collection.ids)]})

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        super(TestKnowledge, cls).tearDownClass()

    def chunks(self, source):
        return self.env['llm.knowledge.chunk'].search([('source_id', '=', source.id)])

    def test_files_and_records_are_indexed_and_found_by_meaning(self):
        self.assertEqual((self.handbook.state, self.faq.state, self.partners_source.state), ('done', 'done', 'done'))
        self.assertEqual(self.collection.dimensions, 384)
        self.assertGreaterEqual(len(self.chunks(self.handbook)), 2, 'cut by tokens: 48 per chunk')
        faq_text = ' '.join(self.chunks(self.faq).mapped('text'))
        self.assertIn('9:00 to 17:00', faq_text)
        self.assertNotIn('secret', faq_text, 'script and style are not text')
        self.assertEqual(set(self.chunks(self.partners_source).mapped('res_id')),
                         {self.alice.id, self.bob.id, self.carol.id, self.zeta.id})
        hits = self.collection.search_chunks('How long do I have to return a product and get my money back?', top_k=2)
        self.assertEqual((hits[0]['res_model'], hits[0]['res_id']), ('llm.knowledge.source', self.handbook.id))
        self.assertIn('30 days', hits[0]['text'])
        self.assertEqual(hits[0]['url'], '/web#model=llm.knowledge.source&id=%d' % self.handbook.id)
        hits = self.collection.search_chunks('Who fixes bicycles?', top_k=1)
        self.assertEqual((hits[0]['res_model'], hits[0]['res_id'], hits[0]['title']), ('res.partner', self.bob.id, 'Bob Bikes'))

    def test_a_field_restricted_to_groups_is_indexed_only_for_readers_within_them(self):
        text = ' '.join(self.chunks(self.actions_source).mapped('text'))
        self.assertIn('Knowledge test action', text)
        self.assertNotIn('violin-key', text, 'code is for base.group_system; the readers are every internal user')
        self.assertIn('code (restricted to base.group_system)', self.actions_source.warning)

    def test_restricted_user_never_gets_a_chunk_of_a_record_it_cannot_read(self):
        question = 'Who supplies our violins?'
        admin = self.collection.search_chunks(question, top_k=10)
        self.assertIn(self.zeta.id, [h['res_id'] for h in admin if h['res_model'] == 'res.partner'])
        as_user = self.collection.sudo(self.user).search_chunks(question, top_k=10)
        partners = [h['res_id'] for h in as_user if h['res_model'] == 'res.partner']
        self.assertNotIn(self.zeta.id, partners, 'another company\'s partner')
        self.assertIn(self.alice.id, partners)
        # top_k counts readable chunks only: the unreadable one does not take a place
        self.assertEqual(len(self.collection.sudo(self.user).search_chunks(question, top_k=3)), 3)
        # the assistant (form and XML-RPC use answer) gives the same sources
        answer = self.assistant.sudo(self.user).answer(question)
        self.assertNotIn(self.zeta.id, [s['res_id'] for s in answer['sources'] if s['res_model'] == 'res.partner'])
        self.assertEqual([s['number'] for s in answer['sources']], list(range(1, len(answer['sources']) + 1)))
        wizard = self.env['llm.assistant.ask.wizard'].sudo(self.user).create({'assistant_id': self.assistant.id,
                                                                              'question': question})
        wizard.action_ask()
        self.assertIn('Alice Ltd', wizard.sources_html)
        self.assertNotIn('Zeta', wizard.sources_html)
        self.assertIn('href="/web#model=res.partner&amp;id=%d"' % self.alice.id, wizard.sources_html)
        # a restricted dataset's answers: its owner (and managers) only
        vault = 'What is the code word of the vault?'
        self.assertEqual(self.collection.search_chunks(vault, top_k=1)[0]['res_model'], 'llm.training.dataset')
        self.assertIn('marmalade', self.collection.search_chunks(vault, top_k=1)[0]['text'])
        self.assertNotIn('llm.training.dataset', [h['res_model'] for h in
                                                  self.collection.sudo(self.user).search_chunks(vault, top_k=10)])
        # rights are checked when answering: once the partner moves to company B, it is gone for the user
        self.alice.company_id = self.company_b
        partners = [h['res_id'] for h in self.collection.sudo(self.user).search_chunks(question, top_k=10)
                    if h['res_model'] == 'res.partner']
        self.assertNotIn(self.alice.id, partners)
        # a collection restricted to managers is not asked for a user outside its readers
        self.collection.reader_group_ids = self.env.ref('llm_training.group_llm_manager')
        self.assertEqual(self.assistant.sudo(self.user).retrieve(question), [])

    def test_sync_resumes_after_a_cut_and_embeds_only_changed_text(self):
        source = self.partners_source
        before = {c.res_id: c.id for c in self.chunks(source)}
        # a run cut after one batch of one record keeps its place
        self.collection._sync(FAR, batch_size=1, max_batches=1)
        self.assertEqual((source.state, source.sync_cursor), ('indexing', self.alice.id))
        self.bob.comment = 'Bob Bikes now sells electric scooters in Utrecht.'
        self.carol.unlink()
        version = self.collection.index_version
        self.collection._sync(FAR, batch_size=1)  # the next run goes on from there
        self.assertEqual((source.state, source.sync_cursor), ('done', 0))
        after = {c.res_id: c.id for c in self.chunks(source)}
        self.assertEqual(after[self.alice.id], before[self.alice.id], 'unchanged text: not embedded again')
        self.assertNotEqual(after[self.bob.id], before[self.bob.id], 'changed text: embedded again')
        self.assertNotIn(self.carol.id, after, 'deleted record: its chunks are gone')
        self.assertGreater(self.collection.index_version, version)
        hits = self.collection.search_chunks('Where can I buy a scooter?', top_k=1)
        self.assertEqual(hits[0]['res_id'], self.bob.id)

    def test_bad_sources_get_a_clear_error_and_the_others_go_on(self):
        bad = self.env['llm.knowledge.collection'].create({'name': 'Bad', 'provider_id': self.local.id,
                                                          'max_file_mb': 0.001})
        broken = file_source(bad, 'broken.pdf', b'%PDF-1.4\nthis is no pdf at all')
        empty = file_source(bad, 'empty.txt', b'')
        big = file_source(bad, 'big.txt', b'word ' * 400)  # 2 KB over a 1 KB limit (a 500 MB file alike)
        odd = file_source(bad, 'table.xyz', b'something')
        good = file_source(bad, 'good.txt', b'Good files are indexed even beside broken ones.')
        bad._sync(FAR)
        self.assertEqual([s.state for s in (broken, empty, big, odd, good)], ['error'] * 4 + ['done'])
        self.assertIn('broken.pdf: unreadable PDF', broken.error)
        self.assertIn('empty', empty.error)
        self.assertIn('big.txt is 0.0 MB; the limit is 0.0 MB', big.error)
        self.assertIn("unknown document type '.xyz'", odd.error)
        unknown = self.env['llm.knowledge.collection'].create({'name': 'Unknown model', 'provider_id': self.local.id,
                                                              'embedding_model': 'no-such-model'})
        source = file_source(unknown, 'good.txt', b'Some text.')
        unknown._sync(FAR)
        self.assertEqual(source.state, 'error')
        self.assertIn("unknown embedding model 'no-such-model'", source.error)

    def test_changing_the_embedding_model_reindexes(self):
        self.assertTrue(self.chunks(self.handbook))
        self.env.cr.execute("SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'")
        if not self.env.cr.fetchone()[0]:  # this server has no pgvector: the store says so, nothing changes
            with self.assertRaisesRegex(ValidationError, 'no "vector" extension'):
                with self.env.cr.savepoint():
                    self.collection.store = 'pgvector'
            self.assertTrue(self.chunks(self.handbook))
        self.collection.write({'chunk_size': 64})
        self.assertFalse(self.chunks(self.handbook))
        self.assertEqual(self.handbook.state, 'pending')
        self.collection._sync(FAR)
        self.assertEqual(self.handbook.state, 'done')
        self.assertTrue(self.chunks(self.handbook))

    def test_an_arabic_question_finds_the_arabic_chunk_with_the_multilingual_model(self):
        arabic = self.env['llm.knowledge.collection'].create({
            'name': 'Arabic', 'provider_id': self.local.id, 'embedding_model': 'multilingual-e5-small',
            'chunk_size': 40, 'chunk_overlap': 0})
        for name, text in ARABIC_FILES:
            file_source(arabic, name, text.encode('utf-8'))
        arabic._sync(FAR)
        self.assertEqual(set(arabic.source_ids.mapped('state')), {'done'}, arabic.source_ids.mapped('error'))
        # cut in the model's own tokens (17 to 25 a file); all-MiniLM-L6-v2's English vocabulary
        # spells Arabic nearly letter by letter (64 to 71), which would make 2 chunks of each
        self.assertEqual(self.env['llm.knowledge.chunk'].search_count([('collection_id', '=', arabic.id)]), 3)
        for question, name in (('كم يوما لدي لاسترجاع أموالي؟', 'refunds.md'),
                               ('متى يفتح فريق خدمة العملاء؟', 'hours.md'),
                               ('هل يغطي الضمان تلف الجهاز بالماء؟', 'warranty.md')):
            hits = arabic.sudo(self.user).search_chunks(question, top_k=1)
            self.assertEqual(hits[0]['title'], name, question)

    def test_assistant_answers_with_numbered_sources_from_a_real_model(self):
        smol = self.env['llm.model'].create({'name': 'SmolLM2', 'provider_id': self.local.id,
                                             'model_ref': 'SmolLM2-135M-Instruct'})
        self.assistant.write({'model_id': smol.id, 'max_answer_tokens': 24, 'top_k': 1, 'purpose': 'support'})
        self.assistant.action_deploy()
        self.assertEqual(self.env['llm.assistant'].get_deployed('support'), self.assistant)
        result = self.assistant.answer('Within how many days can a customer ask for a refund?')
        self.assertTrue(result['text'])
        self.assertEqual(result['sources'][0]['number'], 1)
        self.assertEqual(result['sources'][0]['res_id'], self.handbook.id)
        self.assertIn('30', result['text'])

    def test_embedded_store_reads_the_version_from_the_database(self):
        ref = self.collection._ref()
        EmbeddedStore._loaded.clear()
        self.collection._store().search(ref, [0.0] * 384, 1)
        key = (self.collection._store().config['index_dir'], self.collection.id)
        self.assertEqual(EmbeddedStore._loaded[key][0], ref.version)
        self.collection._bump_version()
        self.assertEqual(self.collection._ref().version, ref.version + 1)
