"""Knowledge (RAG) in the trainer environment: embedding models (embed.py, served by the model
server at POST /embed) and document parsers (parse.py, run as a subprocess by Odoo)."""
