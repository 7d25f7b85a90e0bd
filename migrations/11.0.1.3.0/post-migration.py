# -*- coding: utf-8 -*-
"""11.0.1.3.0: a fine-tuned model's training figures are labelled fields.

Before, the local and Ray trainers' final figures were written into the model's description as a
JSON object ({"precision": "bf16", "train_loss": 0.41, ...}). Those figures move into the new
fields and the description is cleared; a description a person wrote (anything that is not such an
object) is left as it is.
"""
import json

from odoo.addons.llm_training.lib.jobs.job_summary import MODEL_METRICS, model_metric_values


def figures_from_description(text):
    """The trainer's final figures when `text` is exactly their JSON object, else None."""
    try:
        figures = json.loads(text or '')
    except ValueError:
        return None
    known = {key for key, _field in MODEL_METRICS}
    if not isinstance(figures, dict) or not figures or not set(figures) & known:
        return None
    return figures


def migrate(cr, version):
    if not version:
        return
    cr.execute("SELECT id, description FROM llm_model WHERE kind = 'fine_tuned' AND description LIKE '{%%'")
    for model_id, description in cr.fetchall():
        figures = figures_from_description(description)
        if figures is None:
            continue
        values = {field: value for field, value in model_metric_values(figures).items() if value is not False}
        assignments = ', '.join('%s = %%s' % field for field in values)
        cr.execute('UPDATE llm_model SET %sdescription = NULL WHERE id = %%s'
                   % (assignments + ', ' if assignments else ''), list(values.values()) + [model_id])
