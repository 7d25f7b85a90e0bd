"""Knowledge in the trainer env: the embedding model (all-MiniLM-L6-v2 from its package, mean
pooling + L2 norm, batched) and the document parsers, on real files made here."""
import json

import pytest

from trainer.knowledge import embed, parse


@pytest.fixture(scope='module')
def cache():
    return embed.EmbeddingCache()


def test_embeddings_are_normalised_and_do_not_depend_on_the_batch(cache):
    texts = ['The refund window is thirty days.', 'Parcels ship from Rotterdam.', 'Refunds: 30 days after delivery.']
    together, tokens = embed.embed(texts, cache=cache, batch_size=2)  # sorted by length, padded in pairs
    alone = [embed.embed([t], cache=cache)[0][0] for t in texts]
    assert len(together[0]) == 384 and all(t > 3 for t in tokens)
    for a, b in zip(together, alone):
        assert sum(x * x for x in a) == pytest.approx(1.0, abs=1e-5)
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, 'padding must not change a vector (mean over the mask)'
    cos = lambda a, b: sum(x * y for x, y in zip(a, b))
    assert cos(together[0], together[2]) > cos(together[0], together[1]), 'similar meaning, closer vectors'


def test_unknown_model_and_bad_requests_are_refused():
    status, body = embed.answer(json.dumps({'model': 'no-such-model', 'input': ['x']}).encode())
    assert status == 404 and "unknown embedding model 'no-such-model'" in body['error']
    assert embed.answer(b'{"input": []}')[0] == 400
    assert embed.answer(b'not json')[0] == 400


def test_parsers_read_docx_html_and_refuse_broken_files(tmp_path):
    import docx
    document = docx.Document()
    document.add_paragraph('Refunds are paid within five working days.')
    document.save(str(tmp_path / 'policy.docx'))
    assert parse.extract(str(tmp_path / 'policy.docx'), 'docx') == 'Refunds are paid within five working days.'
    (tmp_path / 'page.html').write_text('<html><script>var x;</script><p>Open 9 to 5.</p></html>')
    assert parse.extract(str(tmp_path / 'page.html'), 'html') == 'Open 9 to 5.'
    (tmp_path / 'broken.pdf').write_bytes(b'%PDF-1.4 broken')
    with pytest.raises(parse.ParseError, match='unreadable PDF'):
        parse.extract(str(tmp_path / 'broken.pdf'), 'pdf')
    (tmp_path / 'empty.txt').write_bytes(b'')
    with pytest.raises(parse.ParseError, match='empty'):
        parse.extract(str(tmp_path / 'empty.txt'), 'text')
    (tmp_path / 'big.txt').write_bytes(b'x' * 2000)
    with pytest.raises(parse.ParseError, match='the limit is 1000'):
        parse.extract(str(tmp_path / 'big.txt'), 'text', max_bytes=1000)


ARABIC = ['سياسة الاسترداد: يمكن للعميل استرداد المبلغ خلال ثلاثين يوما من الشراء إذا كان المنتج في حالته الأصلية.',
          'ساعات العمل: يعمل فريق خدمة العملاء من التاسعة صباحا حتى الخامسة مساء من الأحد إلى الخميس.',
          'الضمان: تتمتع الأجهزة بضمان لمدة سنتين ضد عيوب التصنيع ولا يشمل الضرر الناتج عن الماء.',
          'Parcels ship from Rotterdam every Monday.']


def test_an_arabic_question_finds_its_arabic_passage_with_multilingual_e5(cache):
    passages, _ = embed.embed(ARABIC, 'multilingual-e5-small', cache=cache)
    assert len(passages[0]) == 384
    cos = lambda a, b: sum(x * y for x, y in zip(a, b))
    for question, expected in (('كم يوما لدي لاسترجاع أموالي؟', 0), ('متى يفتح فريق خدمة العملاء؟', 1),
                               ('هل يغطي الضمان تلف الجهاز بالماء؟', 2)):
        query = embed.embed([question], 'multilingual-e5-small', cache=cache, input_type='query')[0][0]
        scores = [cos(query, p) for p in passages]
        assert scores.index(max(scores)) == expected, (question, scores)
    # E5 is asymmetric: a question is embedded with its "query: " prefix, unlike a passage
    as_query = embed.embed([ARABIC[0]], 'multilingual-e5-small', cache=cache, input_type='query')[0][0]
    assert cos(as_query, passages[0]) < 0.999
    # a symmetric model makes no difference
    minilm = [embed.embed(['refund window'], cache=cache, input_type=kind)[0][0] for kind in ('query', 'passage')]
    assert minilm[0] == minilm[1]


def test_the_e5_tokenizer_file_counts_as_the_engine_and_keeps_offsets(cache):
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(embed.tokenizer_path('multilingual-e5-small'))
    engine = cache.get('multilingual-e5-small')
    for text in ARABIC:
        encoding = tokenizer.encode(text, add_special_tokens=False)
        # the engine counts <s>, </s> and its "passage: " prefix too
        assert abs(len(encoding.ids) - engine.token_count(text)) <= 6, text
        start, end = encoding.offsets[1]
        assert text[start:end].strip() and encoding.offsets[-1][1] == len(text)
    assert embed.answer(json.dumps({'model': 'multilingual-e5-small', 'input': ['x'],
                                    'input_type': 'question'}).encode())[0] == 400


def test_a_small_batch_runs_on_one_thread_and_its_vectors_do_not_change(cache):
    """A question (a small padded batch) is embedded on one torch thread: its vector, and the
    passages', equal (1e-5) those the same model gave before that path existed (recorded in
    data/minilm_reference_vectors.json)."""
    import os
    import torch
    assert embed.threads_for(15, 8) == 1 and embed.threads_for(embed.ONE_THREAD_TOKENS, 2) == 1
    assert embed.threads_for(embed.ONE_THREAD_TOKENS + 1, 8) == 8, 'indexing batches keep every thread'
    with open(os.path.join(os.path.dirname(__file__), 'data', 'minilm_reference_vectors.json')) as f:
        reference = json.load(f)
    before = torch.get_num_threads()
    query, _ = embed.embed([reference['query']], cache=cache, input_type='query')
    passages, _ = embed.embed(reference['passages'], cache=cache)
    assert torch.get_num_threads() == before, 'the process\'s setting is put back'
    for got, expected in zip(query + passages, [reference['query_vector']] + reference['passage_vectors']):
        assert max(abs(x - y) for x, y in zip(got, expected)) < 1e-5


def test_the_model_server_answers_without_waiting_for_a_delayed_ack():
    """serve.py's handler turns Nagle's algorithm off on its connection: an answer is written as
    headers then body, and with Nagle the body waited 40 ms for the client's delayed ACK (every
    /health and /embed on a keep-alive connection)."""
    import socket
    import types
    from trainer.serve import Handler
    listener = socket.socket()
    listener.bind(('127.0.0.1', 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    connection, _ = listener.accept()
    try:
        handler = Handler.__new__(Handler)  # setup() only: no request is handled
        handler.request, handler.server = connection, types.SimpleNamespace(read_timeout=5)
        handler.setup()
        assert handler.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        for s in (client, connection, listener):
            s.close()


# -- the precision of large batches (indexing) ------------------------------------------------------
LARGE = ['Chunk %d: refunds are paid within thirty days of delivery, in the currency of the order, to '
         'the card or account that paid, less any shipping the customer chose to pay for.' % i for i in range(8)]


def rates_timer(fp32_seconds, bf16_seconds):
    """A fake matmul timer: a row takes `fp32_seconds` in fp32, `bf16_seconds` in bf16."""
    calls = []

    def timer(precision, shape, rows, path):
        calls.append((precision, path))
        return rows * (fp32_seconds if precision == 'fp32' else bf16_seconds)
    timer.calls = calls
    return timer


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / (sum(x * x for x in a) * sum(y * y for y in b)) ** 0.5


def test_the_large_batch_precision_follows_the_measurement_or_the_setting(cache):
    """Never assumed: bf16 measured slower (or not BF16_MIN_GAIN faster) -> fp32; faster -> bf16,
    timed on the model's own layer shapes under autocast; 'fp32' set -> nothing measured."""
    _tokenizer, model = cache.get('all-MiniLM-L6-v2')
    slower = rates_timer(0.001, 0.004)
    choice = embed.choose_precision('auto', model, slower)
    assert choice['precision'] == 'fp32' and choice['bf16_gflops'] < choice['fp32_gflops']
    assert slower.calls and all(path == 'full' for _p, path in slower.calls)
    assert embed.choose_precision('auto', model, rates_timer(0.001, 0.0009))['precision'] == 'fp32', \
        'bf16 costs accuracy: a 10% gain is not enough'
    assert embed.choose_precision('auto', model, rates_timer(0.002, 0.001))['precision'] == 'bf16'
    never = rates_timer(1, 1)
    assert embed.choose_precision('fp32', model, never) == {'precision': 'fp32',
                                                           'source': 'set (llm_training_embed_precision)'}
    assert not never.calls
    with pytest.raises(embed.EmbedError, match='fp16'):
        embed.EmbeddingCache('fp16')


def test_large_batches_run_in_the_measured_precision_and_questions_stay_fp32(cache):
    """A cache whose measurement says bf16 is faster embeds an indexing request in bf16 (vectors
    within cosine 0.995 of fp32's, not equal), says so in its answer and its health, measured
    once; a question on it is exact fp32. Slower bf16, or fp32 forced: the same vectors as fp32."""
    fp32 = embed.encode(LARGE, cache=embed.EmbeddingCache('fp32'))
    assert fp32['precision'] == 'fp32'
    timer = rates_timer(0.002, 0.001)
    fast = embed.EmbeddingCache('auto', timer)
    fast.models = cache.models  # the loaded model, shared
    status, bf16 = embed.answer(json.dumps({'input': LARGE}).encode(), fast)  # as /embed answers
    assert status == 200 and bf16['precision'] == 'bf16'
    assert fast.describe()['large_batches']['all-MiniLM-L6-v2']['precision'] == 'bf16'
    cosines = [cosine(a, b) for a, b in zip(bf16['data'], fp32['data'])]
    assert min(cosines) > 0.995 and bf16['data'] != fp32['data'], cosines
    measured = len(timer.calls)
    assert fast.large_batch_precision('all-MiniLM-L6-v2', None) == 'bf16'
    assert len(timer.calls) == measured, 'measured once per model and process'
    question = embed.encode(['How long do refunds take?'], cache=fast, input_type='query')
    assert question['precision'] == 'fp32'
    assert question['data'] == embed.encode(['How long do refunds take?'], cache=cache, input_type='query')['data']
    slow = embed.EmbeddingCache('auto', rates_timer(0.001, 0.004))
    slow.models = cache.models
    assert embed.encode(LARGE, cache=slow) == fp32


def test_a_question_goes_between_two_batches_of_an_indexing_request(cache):
    """The lock is fair to questions: an indexing request waiting to embed its second batch lets
    a question that arrived during its first go first (a barrier, no timing)."""
    import threading
    tokenizer, model = cache.get('all-MiniLM-L6-v2')
    order, first_batch = [], threading.Event()
    fair = embed.EmbeddingCache('fp32')

    class Recording(object):
        def __call__(self, **batch):
            big = batch['input_ids'].numel() > embed.ONE_THREAD_TOKENS
            if big and not first_batch.is_set():
                first_batch.set()
                with fair.lock.condition:  # the question is waiting for the lock
                    assert fair.lock.condition.wait_for(lambda: fair.lock.small_waiting, timeout=60)
            order.append('index' if big else 'question')
            return model(**batch)
    fair.models['all-MiniLM-L6-v2'] = (tokenizer, Recording())
    indexing = threading.Thread(target=embed.encode, args=(LARGE * 3,), kwargs={'cache': fair, 'batch_size': 8})
    indexing.start()
    assert first_batch.wait(60)
    question = embed.encode(['When are refunds paid?'], cache=fair, input_type='query')
    indexing.join(60)
    assert order == ['index', 'question', 'index', 'index'], order  # 24 texts, batches of 8
    assert question['data'] == embed.encode(['When are refunds paid?'], cache=cache, input_type='query')['data']


def test_the_server_flag_sets_the_precision_and_its_answer_and_health_say_it(cache):
    """serve.py --embed-precision (odoo.conf llm_training_embed_precision) reaches /embed: fp32
    forced, an indexing request answers "precision": "fp32" and /health shows the choice."""
    import threading
    import urllib.request
    from trainer import serve
    assert serve.make_parser().parse_args(['--embed-precision', 'fp32']).embed_precision == 'fp32'
    assert serve.make_parser().parse_args([]).embed_precision == 'auto'
    server = serve.ModelServer(0, embed_precision='fp32')
    server.embeddings.models = cache.models  # the loaded model, shared
    threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True).start()
    url = 'http://127.0.0.1:%d' % server.server_address[1]

    def call(path, body=None):
        request = urllib.request.Request(url + path, data=body and json.dumps(body).encode(),
                                         headers={'Authorization': 'Bearer %s' % server.token})
        with urllib.request.urlopen(request, timeout=60) as answer:
            return json.loads(answer.read().decode())
    try:
        assert call('/embed', {'input': LARGE})['precision'] == 'fp32'
        assert call('/health')['embed'] == {'precision_setting': 'fp32', 'large_batches': {'all-MiniLM-L6-v2': {
            'precision': 'fp32', 'source': 'set (llm_training_embed_precision)'}}}
    finally:
        server.shutdown()
        server.server_close()
