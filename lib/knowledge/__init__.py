"""Knowledge (RAG) without Odoo: chunking by tokens, document parsing through the trainer
environment, vector stores behind one interface, and retrieval within the caller's rights
(given as callables). The ORM layer is models/llm_knowledge_*.py and models/llm_assistant.py."""
