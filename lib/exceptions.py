"""What a provider call can end in, shared by every provider and the engine (OCA queue_job's habit)."""


class TrainingRetryableError(Exception):
    """Transient (network, rate limit, 5xx, not ready yet): try again later, the job keeps its state.

    `seconds`: when to try again (None: the engine's backoff). `keep`: provider data to store even
    though the step is rolled back (e.g. the ids of files already uploaded), so the retry goes on
    from there instead of doing it twice."""

    def __init__(self, message, seconds=None, keep=None):
        super(TrainingRetryableError, self).__init__(message)
        self.seconds = seconds
        self.keep = keep or {}


class TrainingFailedError(Exception):
    """Permanent: no retry will fix it (invalid data, a refused request). The job fails with this message."""


class TrainingAuthError(TrainingFailedError):
    """Credentials or quota: the job fails, and the message says what a manager must fix."""


class InvalidRequestError(TrainingFailedError):
    """The service refused the request itself (a prompt over the model's context, a bad option):
    the caller must change it; the service is fine."""


class ModelNotFoundError(InvalidRequestError):
    """The service has no model by the name asked for (e.g. an unknown embedding model)."""
