from . import openai_api
