# -*- coding: utf-8 -*-
{
    'name': 'LLM Training: test provider',
    'summary': 'A scripted training provider for the llm_training tests (never install in production)',
    'version': '11.0.1.0.0',
    'license': 'LGPL-3',
    'depends': ['llm_training'],
    'data': ['security/ir.model.access.csv'],
    'installable': True,
}
