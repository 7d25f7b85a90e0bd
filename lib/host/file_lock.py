"""An exclusive lock on a file, shared by processes (flock), waited for with a deadline."""
import contextlib
import fcntl
import time

POLL_SECONDS = 0.05


@contextlib.contextmanager
def held(path, timeout, error):
    """Hold an exclusive flock on `path` (created if missing) for the block; after `timeout`
    seconds of waiting for another holder, raise `error(message)`."""
    with open(path, 'a') as lock:
        deadline = time.time() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() > deadline:
                    raise error('another process has held %s for %d s' % (path, timeout))
                time.sleep(POLL_SECONDS)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
