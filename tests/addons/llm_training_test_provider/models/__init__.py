from . import llm_provider_test
from . import llm_test_provider_call
