"""Drive Odoo's web client in a real Chromium (playwright), as a person would.

Runs in the client venv (Python 3.11), started by tests/test_browser.py:

    python drive_odoo.py --url http://127.0.0.1:8169 --db llm_test --screenshots DIR SCENARIO [ARGS JSON]

Logs in as admin, plays the scenario, saves a screenshot of each stage in DIR and prints what it
saw as one JSON line; the test asserts on that and on the database. On an error it prints
{"error": ...} with the browser console and a screenshot of the moment.
"""
import argparse
import json
import os
import sys
import traceback

from playwright.sync_api import sync_playwright

# As the platform notes say: without the background-networking flags Chromium keeps trying to
# reach Google's hosts, which this closed network refuses.
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']
TIMEOUT_MS = 60000  # a busy 2-core machine serves the first page load slowly


class Browser(object):
    def __init__(self, page, url, screenshots):
        self.page, self.url, self.screenshots, self.shots = page, url, screenshots, []

    def shot(self, name):
        path = os.path.join(self.screenshots, name + '.png')
        self.page.screenshot(path=path, full_page=True)
        self.shots.append(path)

    def login(self, db, login, password):
        self.page.goto('%s/web/login?db=%s' % (self.url, db))
        self.page.fill('input[name=login]', login)
        self.page.fill('input[name=password]', password)
        with self.page.expect_navigation():
            self.page.click('button[type=submit]')
        self.opened = 0

    def open(self, fragment):
        """Load the web client on `fragment` (a full page load: a hash change alone would race
        the client still loading its home action)."""
        self.opened += 1
        self.page.goto('%s/web?load=%d#%s' % (self.url, self.opened, fragment))

    def wait_idle(self):
        """Odoo 11 blocks the UI while an RPC runs; wait until it is released."""
        self.page.wait_for_function("!document.body.classList.contains('o_ui_blocked') && "
                                    "!document.querySelector('.o_loading:not([style*=\"none\"])')")

    def pick(self, scope, field, text):
        """Type into a many2one / many2many_tags field and choose the matching suggestion."""
        self.page.fill('%s div[name=%s] input, %s input[name=%s]' % (scope, field, scope, field), text)
        item = self.page.locator('ul.ui-autocomplete:visible li a', has_text=text).first
        item.click()
        self.wait_idle()


def job_wizard(b, args):
    """Jobs list -> New Fine-tuning Job -> data, settings, review -> Submit -> the job's form."""
    seen = {}
    b.open('action=llm_training.llm_training_job_action')
    b.page.wait_for_selector('.o_list_view')
    b.page.click('.o_llm_wizard_button:visible')
    modal = '.modal:visible'
    b.page.wait_for_selector(modal + ' .o_form_view')
    b.page.fill(modal + ' input[name=name]', args['name'])
    b.pick(modal, 'dataset_ids', args['dataset'])
    b.shot('job_wizard_1_data')
    b.page.click(modal + ' button[name=action_next]')
    b.wait_idle()
    b.page.wait_for_selector(modal + ' div[name=provider_id]:visible')
    b.pick(modal, 'provider_id', args['provider'])
    b.pick(modal, 'base_model_id', args['base_model'])
    b.shot('job_wizard_2_settings')
    b.page.click(modal + ' button[name=action_next]')
    b.wait_idle()
    estimate = b.page.wait_for_selector(modal + ' [name=estimate]:visible')
    seen['estimate'] = estimate.inner_text()
    b.shot('job_wizard_3_review')
    b.page.click(modal + ' button[name=action_submit]')
    b.wait_idle()
    b.page.wait_for_selector('.o_form_view .o_statusbar_status')
    b.page.wait_for_function("!document.querySelector('.modal.in, .modal.show')")
    seen['breadcrumb'] = b.page.inner_text('.breadcrumb')
    seen['state'] = b.page.inner_text('.o_statusbar_status .btn-primary, .o_statusbar_status .o_arrow_button.btn-primary')
    b.shot('job_wizard_4_job')
    return seen


def loss_curve(b, args):
    """A completed job's form -> Results tab -> the loss curve's lines, legend and axes."""
    b.open('id=%d&model=llm.training.job&view_type=form' % args['job_id'])
    b.page.wait_for_selector('.o_form_view')
    b.page.click('.o_notebook a[data-toggle=tab]:has-text("Results")')
    b.page.wait_for_selector('.o_llm_loss_curve svg path.nv-line')
    lines = b.page.eval_on_selector_all('.o_llm_loss_curve svg path.nv-line',
                                        "paths => paths.map(p => ({path: p.getAttribute('d')}))")
    b.page.locator('.o_llm_loss_curve').scroll_into_view_if_needed()
    b.shot('loss_curve')
    return {
        'lines': lines,
        'legend': b.page.eval_on_selector_all('.o_llm_loss_curve .nv-legend-text', "els => els.map(e => e.textContent)"),
        'axis_labels': b.page.eval_on_selector_all('.o_llm_loss_curve .nv-axislabel', "els => els.map(e => e.textContent)"),
    }


def import_wizard(b, args):
    """Datasets list -> Import from Conversations -> a channel -> Preview."""
    b.open('action=llm_training.llm_training_dataset_action')
    b.page.wait_for_selector('.o_list_view')
    b.page.click('.o_llm_wizard_button:visible')
    modal = '.modal:visible'
    b.page.wait_for_selector(modal + ' .o_form_view')
    b.pick(modal, 'channel_ids', args['channel'])
    b.pick(modal, 'assistant_partner_ids', args['assistant'])
    b.page.click(modal + ' button[name=action_preview]')
    b.wait_idle()
    preview = b.page.wait_for_selector(modal + ' [name=preview]:has-text("example")')
    b.shot('import_wizard_preview')
    return {'preview': preview.inner_text()}


def landing(b, args):
    """The home page after login -> click the LLM app in the top bar -> where it lands."""
    app = b.page.locator('.oe_application_menu_placeholder a.oe_menu_toggler', has_text=args['app']).first
    app.click()
    b.wait_idle()
    b.page.wait_for_selector('.o_view_manager_content .o_list_view, .modal .o_form_view')
    b.wait_idle()
    b.shot('landing')
    return {'list': b.page.locator('.o_view_manager_content .o_list_view').count(),
            'modals': b.page.locator('.modal:visible').count(),
            'breadcrumb': b.page.inner_text('.breadcrumb'),
            'hash': b.page.evaluate('window.location.hash')}


SCENARIOS = {'landing': landing, 'job_wizard': job_wizard, 'loss_curve': loss_curve, 'import_wizard': import_wizard}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--url', required=True)
    parser.add_argument('--db', required=True)
    parser.add_argument('--login', default='admin')
    parser.add_argument('--password', default='admin')
    parser.add_argument('--screenshots', required=True)
    parser.add_argument('--chromium', default='/usr/bin/chromium')
    parser.add_argument('scenario', choices=sorted(SCENARIOS))
    parser.add_argument('args', nargs='?', default='{}', help='the scenario\'s arguments, JSON')
    options = parser.parse_args()
    os.makedirs(options.screenshots, exist_ok=True)
    console = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=options.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={'width': 1400, 'height': 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.on('console', lambda m: console.append('%s: %s' % (m.type, m.text)))
        page.on('pageerror', lambda e: console.append('pageerror: %s' % e))
        b = Browser(page, options.url, options.screenshots)
        try:
            b.login(options.db, options.login, options.password)
            result = SCENARIOS[options.scenario](b, json.loads(options.args))
            result.update(screenshots=b.shots, console=console)
            rc = 0
        except Exception as e:
            try:
                b.shot('%s_error' % options.scenario)
            except Exception:
                pass
            result = {'error': '%s: %s' % (type(e).__name__, e), 'trace': traceback.format_exc(),
                      'console': console, 'screenshots': b.shots}
            rc = 1
        browser.close()
    print(json.dumps(result))
    return rc


if __name__ == '__main__':
    sys.exit(main())
