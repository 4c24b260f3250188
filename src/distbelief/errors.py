"""The one exception type that means "the user's input is wrong".

The command line prints a `UserError` as a single line (no traceback) and exits
with code 2. Raise it with a message that names the offending value and says how
to fix it, e.g.::

    raise UserError("--replicas must be >= 1, got 0: give at least one model replica")
"""


class UserError(Exception):
    """A problem with the user's input (config, data, model, port): one line, exit code 2."""


class JobFailed(RuntimeError):
    """The job could not finish (a shard died, nothing progressed, every replica was lost)."""


class Tampered(JobFailed):
    """A value in the job's store failed its authentication, or was replayed: someone
    without the job's token wrote to (or deleted from) the store. Never acted on."""
