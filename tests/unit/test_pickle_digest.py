"""The deployment version's digest: by content, not by how the pickler shared objects."""

from __future__ import annotations

import logging
import pickle
import sys
import types

import cloudpickle

from shoal._pickle_digest import pickle_digest


def test_shared_and_unshared_equal_strings_digest_alike() -> None:
    name = "".join(["ap", "p"])
    other = "".join(["a", "pp"])
    assert name is not other
    shared = pickle.dumps((name, name), protocol=5)
    unshared = pickle.dumps((name, other), protocol=5)
    assert shared != unshared  # the raw bytes differ: the second is a memo fetch in one of them
    assert pickle_digest(shared) == pickle_digest(unshared)


def test_content_changes_change_the_digest() -> None:
    base = pickle_digest(pickle.dumps(("model", b"weights", 3), protocol=5))
    assert pickle_digest(pickle.dumps(("model", b"weights", 4), protocol=5)) != base
    assert pickle_digest(pickle.dumps(("model", b"weightz", 3), protocol=5)) != base
    assert pickle_digest(pickle.dumps(("modem", b"weights", 3), protocol=5)) != base
    # Shared mutable objects stay part of what is hashed: the same list twice is not two lists.
    a = [1]
    assert pickle_digest(pickle.dumps((a, a), protocol=5)) != pickle_digest(pickle.dumps(([1], [1]), protocol=5))
    # A 32-hex string that is a bound argument (e.g. a model hash) still counts.
    assert pickle_digest(pickle.dumps(("0" * 32, None), protocol=5)) != \
        pickle_digest(pickle.dumps(("1" * 32, None), protocol=5))


def _module_with_logger(source: str) -> type:
    mod = types.ModuleType("shoal_digest_probe")
    mod.__dict__["__name__"] = "".join(["shoal_digest_", "probe"])  # a fresh string, as a re-import makes
    sys.modules[mod.__name__] = mod
    try:
        exec(compile(source, "<probe>", "exec"), mod.__dict__)
        return mod.__dict__["Model"]  # type: ignore[no-any-return]
    finally:
        del sys.modules[mod.__name__]


SOURCE = '''
import logging
logger = logging.getLogger(__name__)

class Model:
    def predict(self, x):
        logger.info("predict %s", x)
        return x
'''


def test_a_reimported_class_with_a_module_logger_keeps_its_digest() -> None:
    first = _module_with_logger(SOURCE)
    second = _module_with_logger(SOURCE)  # the logger (cached by name) keeps the first name string
    assert logging.getLogger("shoal_digest_probe").name is not second.__module__
    a, b = cloudpickle.dumps(first, protocol=5), cloudpickle.dumps(second, protocol=5)
    assert a != b  # memo sharing and cloudpickle's class tracker ids differ
    assert pickle_digest(a) == pickle_digest(b)
    changed = _module_with_logger(SOURCE.replace("return x", "return x * 2"))
    assert pickle_digest(cloudpickle.dumps(changed, protocol=5)) != pickle_digest(a)
