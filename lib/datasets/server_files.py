"""Dataset files already on the training storage, read in place (never copied into Odoo).

A path is allowed only under the root the administrator set (odoo.conf `llm_training_data_root`),
checked on the real path: symlinks and `..` are resolved first, so neither leads out of the root.
The check runs when the path is saved and again each time the file is opened (a symlink may have
changed since). Opening walks the resolved path from the root one folder at a time with
O_NOFOLLOW, so a link swapped in between the check and the open is refused, not followed.
"""
import errno
import os
import stat


class ServerPathError(ValueError):
    pass


def resolve_server_path(path, root):
    """The real path of `path` (absolute, or relative to `root`) if it is a file under `root`;
    else ServerPathError saying what is wrong and what to do."""
    if not root:
        raise ServerPathError('Files on the server are off: the Odoo configuration sets no llm_training_data_root. '
                              'Ask the administrator to set it to the folder that holds training data, or upload '
                              'the file instead.')
    root_real = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root_real, path))  # an absolute path replaces the root
    if os.path.commonpath([real, root_real]) != root_real:
        raise ServerPathError('The server path %s is outside the training data root %s (after resolving links '
                              'and ".."); put the file under that folder.' % (path, root_real))
    if not os.path.isfile(real):
        raise ServerPathError('The server path %s is not a file under the training data root %s; check the '
                              'name.' % (path, root_real))
    return real



def open_server_path(path, root):
    """The file `path` under `root`, opened for reading (binary), or ServerPathError. The path is
    resolved and checked, then opened from the root's real path component by component, none
    of them followed if it is a link: what is opened is the checked file, whatever changed on
    disk in between."""
    real = resolve_server_path(path, root)
    root_real = os.path.realpath(root)
    parts = os.path.relpath(real, root_real).split(os.sep)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        folder = os.open(root_real, flags | os.O_DIRECTORY)
    except OSError as e:
        raise ServerPathError('The training data root %s cannot be opened (%s).' % (root_real, e.strerror))
    try:
        for name in parts[:-1]:
            inner = os.open(name, flags | os.O_DIRECTORY, dir_fd=folder)
            os.close(folder)
            folder = inner
        fd = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=folder)  # O_NONBLOCK: a FIFO must not hang us
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise ServerPathError('The server path %s is outside the training data root %s (a link appeared '
                                  'in it while it was opened); put the file under that folder.' % (path, root_real))
        raise ServerPathError('The server path %s cannot be opened (%s).' % (path, e.strerror))
    finally:
        os.close(folder)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ServerPathError('The server path %s is not a file under the training data root %s; check the '
                              'name.' % (path, root_real))
    os.set_blocking(fd, True)
    return os.fdopen(fd, 'rb')
