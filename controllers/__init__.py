from . import openai_api
from . import model_export
