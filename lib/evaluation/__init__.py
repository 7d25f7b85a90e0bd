"""Evaluation of a fine-tuned model against its base (or against the deployed model): the
hold-out, the files the trainer's evaluator reads and writes, the answers a service's chat API
gave (OpenAI), the pairwise judge, the headline, the chart's bars and the deploy guard's
statistics. Plain Python 3.7, no Odoo import."""
