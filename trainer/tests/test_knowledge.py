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
