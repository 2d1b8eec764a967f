"""The restricted pure-Python unpickler behind `hear_msm._torch_file`, and its checks.

`RestrictedUnpickler` runs the stdlib's pure-Python unpickler with every opcode that calls, builds
or fills an object limited to allow-listed types: globals come from `callable_globals` (builtins,
`OrderedDict`, `_codecs.encode` here; a subclass adds its own, e.g. torch's tensor rebuilders) or
from the subclass's `find_value`; `argparse.Namespace` and every `ml_collections.*` class become
inert `PickledRecord` stand-ins; dictionary keys and set elements must be scalars or flat tuples
of scalars. `check_structure` then refuses cycles, deep nesting and exponential sharing in what
was built. Every refusal is a `Refused` (an `UnpicklingError`) whose message says what was refused.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import itertools
import pickle
from typing import Any, Callable, Iterator

# A training checkpoint nests about ten levels deep and holds a few thousand objects. The limits
# leave wide room above that while keeping every recursive reader of the result (ours, torch's
# optimizer loader) far from Python's recursion limit and from walks that a shared sub-structure
# referenced twice per level would make exponential.
MAX_NESTING = 100
MAX_OBJECTS = 10_000_000


# --------------------------------------------------------------------------- inert records


class PickledRecord:
    """Inert stand-in for an instance of a class we do not import (Namespace, ConfigDict, ...).

    Unpickling calls ``cls.__new__(cls, *args)`` (NEWOBJ), ``cls(*args)`` (REDUCE) and
    ``obj.__setstate__(state)`` (BUILD); each only stores its arguments.  Subclasses are made
    per pickled global and carry its name in ``pickled_global``.
    """

    pickled_global: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledRecord:
        record = object.__new__(cls)
        record.args = args
        record.kwargs = kwargs
        record.state = None
        return record

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Arguments were stored by __new__; nothing to run.
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"PickledRecord({self.pickled_global}, args={self.args!r}, state={self.state!r})"


# --------------------------------------------------------------------------- the unpickler


class Refused(pickle.UnpicklingError):
    """The file asks for something this reader does not accept; the message says what."""


class RefusedGlobal(Refused):
    """A pickle asked for a global outside the allow-list."""

    def __init__(self, qualname: str) -> None:
        super().__init__(f"refused pickled global {qualname!r}")
        self.qualname = qualname


SCALAR_TYPES = frozenset({str, int, float, bool, type(None), bytes})


def check_hashable(keys: Any, what: str) -> None:
    """Dictionary keys and set elements: scalars, or flat tuples of at most 64 scalars.

    Anything else is refused before it is hashed: hashing a tuple nested a million deep recurses
    in C until the process crashes, and comparing crafted keys can take exponential time.
    """
    for key in keys:
        if type(key) in SCALAR_TYPES:
            continue
        if type(key) is tuple and len(key) <= 64 and all(type(k) in SCALAR_TYPES for k in key):
            continue
        raise Refused(f"a {what} of type {type(key).__name__} is not accepted (only strings, numbers, "
                      "bytes, None and flat tuples of them)")


def _check_scalars(args: tuple) -> tuple:
    if not all(type(a) in SCALAR_TYPES for a in args):
        raise Refused(f"only scalar arguments are accepted here, got {', '.join(type(a).__name__ for a in args)}")
    return args


def _pairs(items: Any = ()) -> list[tuple[Any, Any]]:
    if type(items) in (dict, collections.OrderedDict):
        return list(items.items())  # keys were checked when that dict was built
    if type(items) not in (list, tuple) or not all(type(p) in (list, tuple) and len(p) == 2 for p in items):
        raise Refused("a dict must be built from a list of (key, value) pairs")
    check_hashable((p[0] for p in items), "dictionary key")
    return [tuple(p) for p in items]


def collection_items(items: Any = ()) -> list:
    """The elements of a list, tuple, set or frozenset built by the pickle; anything else is refused."""
    if type(items) not in (list, tuple, set, frozenset):
        raise Refused(f"a collection must be built from a list or tuple, got {type(items).__name__}")
    return list(items)


def _hashable_items(items: Any = ()) -> list:
    items = collection_items(items)
    check_hashable(items, "set element")
    return items


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``: protocol-2 pickles store ``bytes`` as (str, 'latin1')."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise RefusedGlobal(f"_codecs.encode with encoding {describe(encoding)}")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    if args:
        raise Refused("bytes(...) with arguments is not accepted (protocol 2 writes only bytes())")
    return b""


# Functions and types any pickle may name: value -> what calling it (REDUCE, or INST/OBJ in old
# protocols) does instead.
BUILTIN_GLOBALS: dict[tuple[str, str], tuple[Any, Callable]] = {
    ("collections", "OrderedDict"): (collections.OrderedDict, lambda items=(): collections.OrderedDict(_pairs(items))),
    ("_codecs", "encode"): (_latin1_bytes, _latin1_bytes),
    ("builtins", "set"): (set, lambda items=(): set(_hashable_items(items))),
    ("builtins", "frozenset"): (frozenset, lambda items=(): frozenset(_hashable_items(items))),
    ("builtins", "list"): (list, lambda items=(): list(collection_items(items))),
    ("builtins", "tuple"): (tuple, lambda items=(): tuple(collection_items(items))),
    ("builtins", "dict"): (dict, lambda items=(): dict(_pairs(items))),
    ("builtins", "bytes"): (bytes, _empty_bytes),
    # types a config stores as values (ml_collections' FieldReference keeps its field type);
    # called, they take scalars only (str() of a crafted shared structure would take forever)
    **{("builtins", t.__name__): (t, lambda *args, t=t: t(*_check_scalars(args)))
       for t in (int, float, str, bool, complex, slice)},
}

# Classes whose instances are config records: replaced by PickledRecord subclasses.
_RECORD_MODULES = ("ml_collections",)
_RECORD_GLOBALS = {("argparse", "Namespace")}


class RestrictedUnpickler(pickle._Unpickler):
    """The stdlib's pure-Python unpickler with every opcode that calls, builds or fills an object
    restricted to the allow-listed types; ``find_class`` resolves only allow-listed names.

    The C unpickler cannot be used: it lets a subclass override only ``find_class`` and
    ``persistent_load``, not how it fills dicts and sets or calls ``__setstate__``.
    """

    dispatch = dict(pickle._Unpickler.dispatch)
    # (module, name) -> (the value the pickle gets, what calling it does instead); subclasses extend it
    callable_globals: dict[tuple[str, str], tuple[Any, Callable]] = BUILTIN_GLOBALS

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._records: dict[tuple[str, str], type[PickledRecord]] = {}
        self._calls = {id(value): call for value, call in self.callable_globals.values()}

    def find_value(self, module: str, name: str) -> Any:
        """A non-callable global the subclass accepts (dtypes, storage types), or None; it may
        raise Refused for a name it knows to refuse."""
        return None

    def find_class(self, module: str, name: str) -> Any:
        # Overriding find_class skips the stdlib's Python-2 name mapping ("__builtin__.set"
        # in protocol-2 pickles, which torch.save writes), so apply it here.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)

        if (module, name) in self.callable_globals:
            return self.callable_globals[(module, name)][0]
        value = self.find_value(module, name)
        if value is not None:
            return value
        if (module, name) in _RECORD_GLOBALS or module.split(".")[0] in _RECORD_MODULES:
            return self._record_class(module, name)
        raise RefusedGlobal(shorten(f"{module}.{name}", 120))

    def _record_class(self, module: str, name: str) -> type[PickledRecord]:
        key = (module, name)
        if key not in self._records:
            self._records[key] = type(name, (PickledRecord,), {"pickled_global": f"{module}.{name}"})
        return self._records[key]

    def _call(self, func: Any, args: Any) -> Any:
        if type(args) is not tuple:
            raise Refused(f"call arguments must be a tuple, got {type(args).__name__}")
        if isinstance(func, type) and issubclass(func, PickledRecord):
            return func(*args)
        call = self._calls.get(id(func))
        if call is None:
            raise Refused(f"calling {describe(func)} is not accepted")
        return call(*args)

    # -- opcodes that call a global (REDUCE; INST and OBJ of protocols 0/1) or construct one (NEWOBJ)
    def _load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def _instantiate(self, klass: Any, args: list) -> None:
        self.append(self._call(klass, tuple(args)))

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(_new_record(cls, args, {}))

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(_new_record(cls, args, kwargs))

    # -- opcodes that fill an object: only lists, dicts and sets, with checked keys
    def _load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(target, PickledRecord):
            target.__setstate__(state)
        elif type(target) is collections.OrderedDict and type(state) is dict and all(type(k) is str for k in state):
            target.__dict__.update(state)  # a state dict's `_metadata`
        else:
            raise Refused(f"setting the state of {describe(target)} is not accepted")

    def _load_append(self) -> None:
        value = self.stack.pop()
        _target(self.stack, list).append(value)

    def _load_appends(self) -> None:
        items = self.pop_mark()
        _target(self.stack, list).extend(items)

    def _load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        check_hashable((key,), "dictionary key")
        _target(self.stack, dict, collections.OrderedDict)[key] = value

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        check_hashable(items[0::2], "dictionary key")
        target = _target(self.stack, dict, collections.OrderedDict)
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def _load_dict(self) -> None:
        items = self.pop_mark()
        check_hashable(items[0::2], "dictionary key")
        self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})

    def _load_additems(self) -> None:
        items = self.pop_mark()
        check_hashable(items, "set element")
        _target(self.stack, set).update(items)

    def _load_frozenset(self) -> None:
        items = self.pop_mark()
        check_hashable(items, "set element")
        self.append(frozenset(items))

    def _load_bytearray8(self) -> None:
        # the stdlib allocates the declared length before reading; torch.save (protocol 2) never writes it
        raise Refused("protocol-5 bytearrays are not accepted")

    for _opcode, _method in (
        (pickle.REDUCE, _load_reduce), (pickle.NEWOBJ, _load_newobj), (pickle.NEWOBJ_EX, _load_newobj_ex),
        (pickle.BUILD, _load_build), (pickle.APPEND, _load_append), (pickle.APPENDS, _load_appends),
        (pickle.SETITEM, _load_setitem), (pickle.SETITEMS, _load_setitems), (pickle.DICT, _load_dict),
        (pickle.ADDITEMS, _load_additems), (pickle.FROZENSET, _load_frozenset),
        (pickle.BYTEARRAY8, _load_bytearray8),
    ):
        dispatch[_opcode[0]] = _method
    del _opcode, _method


def _new_record(cls: Any, args: Any, kwargs: Any) -> PickledRecord:
    if not (isinstance(cls, type) and issubclass(cls, PickledRecord)):
        raise Refused(f"constructing {describe(cls)} is not accepted")
    if type(args) is not tuple or type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
        raise Refused("constructor arguments must be a tuple and a dict with string keys")
    return cls.__new__(cls, *args, **kwargs)


def _target(stack: list, *types: type) -> Any:
    target = stack[-1]
    if type(target) not in types:
        raise Refused(f"adding items to {describe(target)} is not accepted")
    return target


# --------------------------------------------------------------------------- structure checks

_END = object()


def _children(obj: Any, forbidden: tuple[type, ...], why: str) -> Iterator[Any] | None:
    """What a container refers to, or None for a leaf (scalar, tensor, dtype, type, ...)."""
    if isinstance(obj, dict):
        attributes = obj.__dict__.values() if type(obj) is collections.OrderedDict else ()
        return itertools.chain(obj.keys(), obj.values(), attributes)
    if isinstance(obj, (list, tuple, set, frozenset)):
        return iter(obj)
    if isinstance(obj, PickledRecord):
        return iter((obj.args, obj.kwargs, obj.state))
    if forbidden and isinstance(obj, forbidden):
        raise Refused(why)
    return None


def check_structure(root: Any, forbidden: tuple[type, ...] = (), why: str = "") -> None:
    """Refuse reference cycles, nesting deeper than MAX_NESTING, and more than MAX_OBJECTS objects
    counted once per path (a part referenced twice counts twice: that is what a recursive reader
    visits); also any object of a `forbidden` type, saying `why`. One pass, iterative, each
    container visited once."""
    finished: dict[int, tuple[int, int]] = {}  # id -> (height, objects per path)
    on_path: set[int] = set()
    children = _children(root, forbidden, why)
    if children is None:
        return
    stack = [[root, children, 0, 1]]  # container, children left, height below it, objects per path
    on_path.add(id(root))
    while stack:
        frame = stack[-1]
        child = next(frame[1], _END)
        if child is _END:
            stack.pop()
            on_path.discard(id(frame[0]))
            finished[id(frame[0])] = (frame[2] + 1, frame[3])
            if stack:
                _add_below(stack[-1], frame[2] + 1, frame[3])
            continue
        if id(child) in finished:
            _add_below(frame, *finished[id(child)])
            continue
        grandchildren = _children(child, forbidden, why)
        if grandchildren is None:
            _add_below(frame, 0, 1)
        elif id(child) in on_path:
            raise Refused("the pickled data refers to itself (a reference cycle); checkpoints hold "
                          "trees of tensors and plain values")
        elif len(stack) >= MAX_NESTING:
            raise Refused(f"the pickled data is nested more than {MAX_NESTING} levels deep")
        else:
            on_path.add(id(child))
            stack.append([child, grandchildren, 0, 1])
    if finished[id(root)][0] > MAX_NESTING:
        raise Refused(f"the pickled data is nested more than {MAX_NESTING} levels deep")


def _add_below(frame: list, height: int, objects: int) -> None:
    frame[2] = max(frame[2], height)
    frame[3] += objects
    if frame[3] > MAX_OBJECTS:
        raise Refused(f"the pickled data unfolds into more than {MAX_OBJECTS} objects "
                      "(a shared part counted once per reference)")


# --------------------------------------------------------------------------- messages


def shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: Any) -> str:
    """A short name for a value from an untrusted file (never its full repr)."""
    if isinstance(value, type) or callable(value):
        module = getattr(value, "__module__", None) or "?"
        return shorten(f"{module}.{getattr(value, '__qualname__', type(value).__name__)}", 120)
    if type(value) in SCALAR_TYPES:
        return shorten(repr(value), 80)
    return f"a {type(value).__name__}"
