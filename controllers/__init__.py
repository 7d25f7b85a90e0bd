from . import v1_hooks  # the /v1/ request hooks (see its docstring), installed once at import
from . import openai_api
from . import model_export
from . import knowledge_api
