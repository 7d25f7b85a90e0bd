from . import llm_training_job_wizard
from . import llm_training_job_budget_wizard
from . import llm_model_compare_wizard
from . import llm_training_dataset_import_wizard
from . import llm_api_key_wizard
from . import llm_model_export_wizard
from . import llm_assistant_ask_wizard
from . import llm_model_deploy_wizard
