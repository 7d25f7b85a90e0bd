# -*- coding: utf-8 -*-
import json

from odoo import fields, models


def _prompt_text(prompt):
    if isinstance(prompt, list):
        return '\n'.join('%s: %s' % (m.get('role'), m.get('content') or '') for m in prompt)
    return prompt or ''


class LlmTrainingEvaluationExample(models.Model):
    """One example of an evaluation, side by side: the prompt, the reference answer, each model's
    answer and scores. Ordered worst regression first (the evaluated model's score minus the
    compared model's, on the main metric)."""
    _name = 'llm.training.evaluation.example'
    _description = 'LLM Evaluation Example'
    _order = 'difference asc, sequence'

    evaluation_id = fields.Many2one('llm.training.evaluation', required=True, ondelete='cascade', index=True,
                                    readonly=True)
    company_id = fields.Many2one(related='evaluation_id.company_id', store=True, readonly=True)
    visibility = fields.Selection(related='evaluation_id.visibility', store=True, readonly=True)
    user_id = fields.Many2one(related='evaluation_id.user_id', store=True, readonly=True)
    sequence = fields.Integer(readonly=True)
    prompt = fields.Text(readonly=True)
    expected = fields.Text(string='Reference Answer', readonly=True)
    reference_answer = fields.Text(string='Compared Model Answer', readonly=True)
    candidate_answer = fields.Text(string='Evaluated Model Answer', readonly=True)
    reference_score = fields.Float(readonly=True, digits=(16, 4), help='The compared model, main metric.')
    candidate_score = fields.Float(readonly=True, digits=(16, 4), help='The evaluated model, main metric.')
    difference = fields.Float(readonly=True, digits=(16, 4), index=True,
                              help='Evaluated minus compared, main metric (negative: a regression).')
    scores = fields.Text(readonly=True, help='Every score of both models on this example (JSON).')
    judge_outcome = fields.Selection([('candidate', 'Evaluated model better'), ('reference', 'Compared model better'),
                                      ('tie', 'Tie'), ('invalid', 'No verdict')], readonly=True, string='Judge',
                                     help='Both orders of the answers must agree for a win; empty: not judged.')
    judge_replies = fields.Text(readonly=True, help="The judge's two replies (compared model's answer as A, then "
                                                    "the evaluated model's), as JSON.")

    def _values_from_row(self, evaluation, sequence, row, metric):
        reference, candidate = row.get('reference') or {}, row.get('candidate') or {}
        ref_score, cand_score = reference.get(metric), candidate.get(metric)
        sign = -1.0 if metric in ('loss', 'perplexity') else 1.0
        return {
            'evaluation_id': evaluation.id, 'sequence': sequence, 'prompt': _prompt_text(row.get('prompt')),
            'expected': row.get('expected') or '', 'reference_answer': reference.get('answer') or '',
            'candidate_answer': candidate.get('answer') or '',
            'reference_score': ref_score or 0.0, 'candidate_score': cand_score or 0.0,
            'difference': sign * ((cand_score or 0.0) - (ref_score or 0.0)),
            'scores': json.dumps({'reference': {k: v for k, v in reference.items() if k != 'answer'},
                                  'candidate': {k: v for k, v in candidate.items() if k != 'answer'}}),
        }
