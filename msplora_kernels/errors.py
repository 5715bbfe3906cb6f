"""Exception types users can catch."""


class DtypeMismatchError(TypeError, RuntimeError):
    """x and weight differ in dtype.

    A RuntimeError too, because that is what nn.Linear raises for the same input,
    so code written against nn.Linear keeps working.
    """


class AdapterMismatchError(ValueError):
    """An adapter file does not fit the model (keys, shapes or config)."""


class IncompleteAdapterError(RuntimeError):
    """An adapter tensor to be written is not whole: sharded or offloaded by an engine that was not
    gathered. The writer refuses and writes nothing."""
