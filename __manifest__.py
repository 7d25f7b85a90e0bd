# -*- coding: utf-8 -*-
{
    'name': 'LLM Training',
    'summary': 'Fine-tune language models on your own data: datasets, jobs, providers, models',
    'description': 'Datasets, fine-tuning jobs (local Hugging Face trainer, other providers), '
                   'a cron that drives them, and the resulting models. See README.md.',
    'version': '11.0.1.2.0',
    'category': 'Productivity',
    'license': 'LGPL-3',
    'author': 'llm_training',
    'depends': ['mail'],
    # orjson is optional (lib/dataset_validator.py falls back to json); jsonschema is for the tests only
    'external_dependencies': {'python': ['psutil', 'requests', 'openai', 'tokenizers', 'pyarrow']},
    'data': [
        'security/llm_training_security.xml',
        'security/ir.model.access.csv',
        'data/llm_training_data.xml',
        'data/llm_training_schedule_data.xml',
        'views/assets.xml',
        'views/llm_provider_views.xml',
        'views/llm_model_views.xml',
        'views/llm_training_dataset_views.xml',
        'views/llm_training_job_metric_views.xml',
        'views/llm_training_job_views.xml',
        'wizards/llm_training_job_wizard_views.xml',
        'wizards/llm_training_job_budget_wizard_views.xml',
        'wizards/llm_model_compare_wizard_views.xml',
        'views/llm_training_schedule_views.xml',
        'wizards/llm_training_dataset_import_wizard_views.xml',
        'views/llm_api_key_views.xml',
        'data/llm_training_api_data.xml',
        'views/llm_training_menus.xml',
    ],
    'demo': [
        'demo/llm_training_demo.xml',
    ],
    'application': True,
    'installable': True,
}
