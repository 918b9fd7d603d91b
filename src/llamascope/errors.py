"""The one exception type users see: a clear message naming the file, key or setting."""


class LlamascopeError(Exception):
    """A problem with the user's input (file, key, setting). The CLI prints it as one line."""
