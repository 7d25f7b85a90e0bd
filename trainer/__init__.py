"""The llm_training trainer: runs in its own Python 3.11 venv, never imported by the Odoo addon."""
