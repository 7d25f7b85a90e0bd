"""Training services as plain adapters (see base.py). Each registers itself by its service name;
another addon adds a service with `register` and a `selection_add` on llm.provider.service."""
ADAPTERS = {}


def register(cls):
    ADAPTERS[cls.service] = cls
    return cls


def adapter_class(service):
    return ADAPTERS.get(service)


from . import local, openai_fine_tuning, ray_jobs  # noqa: E402,F401  (they register themselves)
