"""The base of every error that reports bad input (a file, a folder, a config value).

Such an error's message already names the file and the problem, so ``launch.main`` and the
command-line tools print it as one line and exit, without a traceback.  No jax here: the eval
bridge uses these too.
"""


class InputError(Exception):
    """Bad input the user fixes; the message names the file and the problem."""
