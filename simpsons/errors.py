"""The one mark of an error written for the user: its message is one sentence that names the
thing and the fix, so a job prints it without a traceback and exits 2 (simpsons.cli.run_job)."""


class UserError(Exception):
    """Base of every error whose message is meant for the user (config, data, sources, storage,
    cluster capacity)."""
