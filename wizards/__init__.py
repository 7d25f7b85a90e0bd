from . import llm_training_job_wizard
