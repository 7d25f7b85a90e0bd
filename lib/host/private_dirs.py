"""Folders only Odoo's user may read: the data folder's job folders hold training data
(train.jsonl), the model server's run folder holds its token."""
import os


def make_private_dirs(path, top):
    """Create `path` and the folders between it and `top` (both included; `top` must be `path` or
    one of its parents), each mode 0700, also when it existed before with a wider mode (older
    versions made them 0755). Folders above `top` are left as they are."""
    path, top = os.path.abspath(path), os.path.abspath(top)
    if os.path.commonpath([path, top]) != top:
        raise ValueError('%s is not under %s' % (path, top))
    chain = [path]
    while chain[-1] != top:
        chain.append(os.path.dirname(chain[-1]))
    for folder in reversed(chain):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        if os.stat(folder).st_mode & 0o077:
            os.chmod(folder, 0o700)
    return path
