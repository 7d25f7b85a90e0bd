# -*- coding: utf-8 -*-
"""11.0.1.2.0: models get a lifecycle state.

- Models archived before this version get the `archived` state (the others start as draft).
"""


def migrate(cr, version):
    if not version:
        return
    cr.execute("UPDATE llm_model SET state = 'archived' WHERE active IS NOT TRUE")
