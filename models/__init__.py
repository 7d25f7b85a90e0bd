from . import llm_provider
from . import llm_model
from . import llm_training_dataset
from . import llm_training_job_event
from . import llm_training_job_metric
from . import llm_training_job
from . import llm_provider_local
from . import llm_provider_openai
