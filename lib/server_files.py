"""Dataset files already on the training storage, read in place (never copied into Odoo).

A path is allowed only under the root the administrator set (odoo.conf `llm_training_data_root`),
checked on the real path: symlinks and `..` are resolved first, so neither leads out of the root.
The check runs when the path is saved and again each time the file is opened (a symlink may have
changed since).
"""
import os


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
