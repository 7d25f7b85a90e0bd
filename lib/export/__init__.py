"""Exports of fine-tuned models (trainer/export.py run as a detached process; no Odoo import)."""
