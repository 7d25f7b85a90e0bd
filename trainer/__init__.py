"""The llm_training trainer: runs in its own Python 3.11 venv, never imported by the Odoo addon
(except job_files.py: the job folder's names, standard library only)."""
