"""Submit the demo fine-tuning job over XML-RPC and follow it until it ends.

Runs against the demo Odoo that `make demo` started; Submit moves the job on at once and the cron
drives it from there, not this script: it only presses Submit and reads state and progress, as
another addon would."""
import argparse
import sys
import time
import xmlrpc.client

FINAL = ('completed', 'failed', 'cancelled')


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--url', default='http://127.0.0.1:8069')
    parser.add_argument('--db', default='llm_demo')
    parser.add_argument('--login', default='admin')
    parser.add_argument('--password', default='admin')
    parser.add_argument('--timeout', type=int, default=1800, help='seconds to wait for the job')
    args = parser.parse_args()

    common = xmlrpc.client.ServerProxy('%s/xmlrpc/2/common' % args.url)
    uid = common.authenticate(args.db, args.login, args.password, {})
    models = xmlrpc.client.ServerProxy('%s/xmlrpc/2/object' % args.url, allow_none=True)

    def call(model, method, *params, **kw):
        return models.execute_kw(args.db, uid, args.password, model, method, list(params), kw)

    job_id = call('ir.model.data', 'xmlid_to_res_id', 'llm_training.demo_job_northwind')
    if not job_id:
        sys.exit('[demo] the demo job is missing (was the database created without demo data?)')
    job = call('llm.training.job', 'read', [job_id], fields=['name', 'state'])[0]
    if job['state'] == 'draft':
        call('llm.training.job', 'action_submit', [job_id])
        print('[demo] submitted job %d "%s": Submit starts it at once, the cron (every minute) follows it'
              % (job_id, job['name']))
    else:
        print('[demo] job %d "%s" is already %s' % (job_id, job['name'], job['state']))

    started = time.time()
    last, training_at = None, None
    fields = ['state', 'progress', 'current_step', 'total_steps', 'error_message', 'result_model_id']
    while True:
        job = call('llm.training.job', 'read', [job_id], fields=fields)[0]
        line = '%s %.0f%% (step %s/%s)' % (job['state'], job['progress'], job['current_step'], job['total_steps'])
        if line != last:
            print('[demo] %4ds  %s' % (time.time() - started, line), flush=True)
            last = line
        if training_at is None and job['state'] in ('training',) + FINAL:
            training_at = time.time() - started
            print('[demo] Submit to %s: %.0f s' % (job['state'], training_at), flush=True)
        if job['state'] in FINAL:
            break
        if time.time() - started > args.timeout:
            sys.exit('[demo] gave up waiting after %d s; the job goes on in Odoo' % args.timeout)
        time.sleep(1)
    if job['state'] != 'completed':
        sys.exit('[demo] the job ended %s: %s' % (job['state'], job['error_message']))
    print('[demo] completed in %d s; model registered: %s' % (time.time() - started, job['result_model_id'][1]))


if __name__ == '__main__':
    main()
