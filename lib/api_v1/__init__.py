"""The API we serve (/v1, OpenAI's shapes): its protocol and the API keys' usage counters."""
