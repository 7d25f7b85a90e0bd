"""The OpenAI-compatible API's latency with 1,000 jobs in the database.

    python bench/bench_api.py -c ODOO_CONF -d DB [--jobs 1000] [--requests 300]

Runs in Odoo's venv on a database with llm_training and the scripted test provider, as
scripts/bench.sh makes it. It creates the jobs (and an API key), starts Odoo's HTTP server on
the config's port (threaded, no cron), then measures p50/p95 of `GET /v1/fine_tuning/jobs/{id}`
and of a page of the list (`?limit=20&after=...`, in the middle of the 1,000), and, as the
baseline, the same reads over XML-RPC (`read` of the job, `search_read` of 20 jobs) on the same
server in the same run. Then, where the trainer environment and SmolLM2 are set up, a streamed
chat completion through `/v1/chat/completions` against the same request sent straight to the
persistent model server (its Odoo-side client, in this process), in alternation: time to first
token and decode tokens/s, i.e. what the API adds. The servers are stopped and the jobs deleted
at the end.
"""
import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import xmlrpc.client

import requests

import odoo
from odoo import SUPERUSER_ID, api

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.machine import cpu_line  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
JOB_FIELDS = ['name', 'state', 'create_date', 'base_model_id', 'dataset_ids', 'validation_dataset_ids', 'epochs',
              'batch_size', 'learning_rate_multiplier', 'seed', 'trained_tokens', 'error_message', 'finished_at',
              'estimated_finish', 'result_model_id', 'suffix', 'api_metadata', 'hyperparameters']


def make_data(env, n):
    provider = env['llm.provider'].create({'name': 'Bench API', 'service': 'test', 'max_concurrent_jobs': 0})
    model = env['llm.model'].create({'name': 'Bench API model', 'provider_id': provider.id, 'model_ref': 'bench-api'})
    lines = ''.join(json.dumps({'messages': [{'role': 'user', 'content': 'Q%d' % i},
                                             {'role': 'assistant', 'content': 'A%d' % i}]}) + '\n' for i in range(12))
    attachment = env['ir.attachment'].create({'name': 'b.jsonl', 'datas_fname': 'b.jsonl',
                                              'datas': base64.b64encode(lines.encode())})
    dataset = env['llm.training.dataset'].create({'name': 'bench', 'attachment_ids': [(6, 0, attachment.ids)]})
    job_ids = [env['llm.training.job'].with_context(tracking_disable=True).create({
        'name': 'bench %d' % i, 'provider_id': provider.id, 'base_model_id': model.id,
        'dataset_ids': [(6, 0, dataset.ids)], 'epochs': 0, 'suffix': 'b%d' % i,
        'api_metadata': json.dumps({'batch': str(i % 10)})}).id for i in range(n)]
    env.cr.execute("UPDATE llm_training_job SET state = 'training', external_job_id = 'bench-' || id WHERE id IN %s",
                   (tuple(job_ids),))
    key = env['llm.api.key']._generate('bench', env.user)[1]
    # A benchmark sets the limits it needs: the API's own 600 requests/minute per key (0: none)
    # would answer 429 in the middle of the timed requests on a fast machine.
    env['ir.config_parameter'].set_param('llm_training.api_requests_per_minute', '0')
    env['ir.config_parameter'].set_param('llm_training.api_running_jobs_per_company', '0')
    local = env['llm.provider'].create({'name': 'Bench API local', 'service': 'local'})
    env['llm.model'].create({'name': 'SmolLM2 (bench)', 'provider_id': local.id, 'model_ref': 'SmolLM2-135M-Instruct'})
    return provider, model, dataset, job_ids, key, local


CHAT_MESSAGES = [{'role': 'user', 'content': 'Write a short story about a robot who learns to paint.'}]
CHAT_TOKENS = 48


def api_chat(base, headers):
    """(time to first token, decode tokens/s) of one streamed completion through the API."""
    start = time.perf_counter()
    first, tokens = None, 0
    with requests.post('%s/v1/chat/completions' % base, headers=headers, stream=True, timeout=300, json={
            'model': 'SmolLM2-135M-Instruct', 'messages': CHAT_MESSAGES, 'max_tokens': CHAT_TOKENS,
            'temperature': 0, 'stream': True, 'stream_options': {'include_usage': True}}) as answer:
        assert answer.status_code == 200, answer.text
        for line in answer.iter_lines(chunk_size=1):  # no read-ahead: each event as it comes
            if not line.startswith(b'data: ') or line == b'data: [DONE]':
                continue
            chunk = json.loads(line[6:].decode())
            if chunk.get('choices') and chunk['choices'][0]['delta'].get('content') and first is None:
                first = time.perf_counter()
            if chunk.get('usage'):
                tokens = chunk['usage']['completion_tokens']
    end = time.perf_counter()
    return first - start, (tokens - 1) / (end - first)


def direct_chat(server, path):
    """The same, straight to the model server."""
    start = time.perf_counter()
    first, tokens = None, 0
    for item in server.chat_stream(path, CHAT_MESSAGES, max_tokens=CHAT_TOKENS, temperature=0):
        if item.get('delta') and first is None:
            first = time.perf_counter()
        if 'completion_tokens' in item:
            tokens = item['completion_tokens']
    end = time.perf_counter()
    return first - start, (tokens - 1) / (end - first)


def wait_port(port, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError('the Odoo server exited with %s' % process.returncode)
        with socket.socket() as probe:
            if probe.connect_ex(('127.0.0.1', port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError('the Odoo server did not open port %d' % port)


def timed(call, n):
    call()  # warm
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000.0)
    samples.sort()
    return statistics.median(samples), samples[int(round(0.95 * (len(samples) - 1)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-c', '--config', required=True)
    parser.add_argument('-d', '--database', required=True)
    parser.add_argument('--jobs', type=int, default=1000)
    parser.add_argument('--requests', type=int, default=300)
    parser.add_argument('--chat-repeats', type=int, default=3)
    args = parser.parse_args()
    odoo.tools.config.parse_config(['-c', args.config, '-d', args.database, '--log-level=warn'])
    port = odoo.tools.config['http_port']
    registry = odoo.registry(args.database)
    with api.Environment.manage(), registry.cursor() as cr:
        env = api.Environment(cr, SUPERUSER_ID, {})
        provider, model, dataset, job_ids, key, local = make_data(env, args.jobs)
        adapter = local._adapter()
        server_client = adapter.model_server()
        try:
            model_path = adapter.model_path('SmolLM2-135M-Instruct')
        except Exception as e:  # no trainer set-up: the latency lines only
            model_path = None
            print('chat: skipped (%s)' % e)
        cr.commit()
    server = subprocess.Popen([sys.executable, os.path.join(HERE, '..', 'scripts', 'odoo'), '-c', args.config,
                               '-d', args.database, '--max-cron-threads=0', '--log-level=warn',
                               '--logfile=%s' % os.path.join(os.path.dirname(args.config), 'bench_api_server.log')],
                              start_new_session=True)
    try:
        wait_port(port, server)
        base = 'http://127.0.0.1:%d' % port
        session = requests.Session()
        headers = {'Authorization': 'Bearer %s' % key}
        job_id, middle = job_ids[len(job_ids) // 3], job_ids[len(job_ids) // 2]

        def api_get():
            answer = session.get('%s/v1/fine_tuning/jobs/ftjob-%d' % (base, job_id), headers=headers, timeout=30)
            assert answer.status_code == 200, answer.text

        def api_page():
            answer = session.get('%s/v1/fine_tuning/jobs' % base, params={'limit': 20, 'after': 'ftjob-%d' % middle},
                                 headers=headers, timeout=30)
            assert answer.status_code == 200 and len(answer.json()['data']) == 20, answer.text

        rpc = xmlrpc.client.ServerProxy('%s/xmlrpc/2/object' % base)
        uid = xmlrpc.client.ServerProxy('%s/xmlrpc/2/common' % base).authenticate(args.database, 'admin', 'admin', {})

        def rpc_read():
            rpc.execute_kw(args.database, uid, 'admin', 'llm.training.job', 'read', [[job_id]], {'fields': JOB_FIELDS})

        def rpc_page():
            rpc.execute_kw(args.database, uid, 'admin', 'llm.training.job', 'search_read', [[('id', '<', middle)]],
                           {'fields': JOB_FIELDS, 'limit': 20, 'order': 'id desc'})

        print('CPU: %s' % cpu_line())
        for label, call, baseline in (('GET /v1/fine_tuning/jobs/{id}', api_get, rpc_read),
                                      ('GET /v1/fine_tuning/jobs?limit=20&after=', api_page, rpc_page)):
            p50, p95 = timed(call, args.requests)
            b50, b95 = timed(baseline, args.requests)
            print('%5d jobs, %-42s p50 %6.1f ms  p95 %6.1f ms   XML-RPC %s: p50 %6.1f ms  p95 %6.1f ms   '
                  'ratio p50 %.2fx' % (args.jobs, label, p50, p95, 'read' if baseline is rpc_read else 'search_read',
                                       b50, b95, p50 / b50))
        if model_path:
            api_chat(base, headers)  # starts the model server and loads the model
            runs = {'api': [], 'direct': []}
            for _ in range(args.chat_repeats):
                runs['api'].append(api_chat(base, headers))
                runs['direct'].append(direct_chat(server_client, model_path))
            median = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}
            print('chat, SmolLM2, %d tokens, streamed: /v1/chat/completions first token %6.1f ms, %5.1f tokens/s;  '
                  'model server direct %6.1f ms, %5.1f tokens/s;  ratio first token %.2fx, tokens/s %.2fx'
                  % (CHAT_TOKENS, median['api'][0] * 1000, median['api'][1], median['direct'][0] * 1000,
                     median['direct'][1], median['api'][0] / median['direct'][0], median['api'][1] / median['direct'][1]))
    finally:
        server_client.stop()
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        with api.Environment.manage(), registry.cursor() as cr:
            env = api.Environment(cr, SUPERUSER_ID, {})
            jobs = env['llm.training.job'].browse(job_ids)
            jobs._write_workflow({'state': 'cancelled'})
            jobs.unlink()
            env['llm.api.key'].search([('name', '=', 'bench')]).unlink()
            env['llm.model'].browse(model.id).unlink()
            env['llm.training.dataset'].browse(dataset.id).unlink()
            env['llm.model'].search([('provider_id', '=', local.id)]).unlink()
            env['llm.provider'].browse([provider.id, local.id]).unlink()
            cr.commit()


if __name__ == '__main__':
    main()
