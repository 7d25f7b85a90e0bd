# -*- coding: utf-8 -*-
"""11.0.1.2.0: metrics say which values were measured; models get a lifecycle state.

- `has_train_loss`, `has_valid_loss`, `has_valid_token_accuracy` are new: a value measured before
  this version is one whose column is not NULL (Odoo 11 reads NULL as 0.0, hence the flags).
- Models archived before this version get the `archived` state (the others start as draft).
"""


def migrate(cr, version):
    if not version:
        return
    cr.execute("""UPDATE llm_training_job_metric
                     SET has_train_loss = train_loss IS NOT NULL, has_valid_loss = valid_loss IS NOT NULL,
                         has_valid_token_accuracy = valid_token_accuracy IS NOT NULL""")
    cr.execute("UPDATE llm_model SET state = 'archived' WHERE active IS NOT TRUE")
